/* A multi-threaded server with constant-size requests: each worker builds a request,
 * a response and a buffer per operation; one object in eight is handed to the next
 * worker, which frees it (cross-thread frees). Prints ops/s. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct request { long id; int method; char path[180]; };
struct response { long id; int status; char header[56]; };
struct session { long id; char key[40]; };

#define THREADS 4
#define RING 1024

struct mailbox { _Atomic(void *) slots[RING]; atomic_ulong head, tail; };
static struct mailbox boxes[THREADS];
static long ops_per_thread;

__attribute__((noinline)) static struct request *new_request(long id) {
    struct request *r = malloc(sizeof *r);
    r->id = id; r->method = 1; memcpy(r->path, "/index.html", 12);
    return r;
}
__attribute__((noinline)) static struct response *new_response(long id) {
    struct response *r = malloc(sizeof *r);
    r->id = id; r->status = 200; memcpy(r->header, "HTTP/1.1", 9);
    return r;
}
__attribute__((noinline)) static struct session *new_session(long id) {
    struct session *s = malloc(sizeof *s);
    s->id = id; s->key[0] = 'k';
    return s;
}

static void post(int to, void *p) {
    struct mailbox *b = &boxes[to];
    unsigned long t = atomic_load(&b->tail);
    if (t - atomic_load(&b->head) >= RING) { free(p); return; }  /* full: free locally */
    atomic_store(&b->slots[t % RING], p);
    atomic_store(&b->tail, t + 1);
}

static void drain(int me) {
    struct mailbox *b = &boxes[me];
    unsigned long h = atomic_load(&b->head), t = atomic_load(&b->tail);
    for (; h < t; h++) free(atomic_load(&b->slots[h % RING]));
    atomic_store(&b->head, h);
}

static pthread_mutex_t post_lock[THREADS];

static void *worker(void *arg) {
    int me = (int)(long)arg, next = (me + 1) % THREADS;
    long checksum = 0;
    struct session *keep[64] = {0};
    for (long i = 0; i < ops_per_thread; i++) {
        struct request *q = new_request(i);
        struct response *r = new_response(q->id);
        struct session *s = new_session(i);
        checksum += q->method + r->status + s->key[0];
        free(q);
        if (i % 8 == 0) {
            pthread_mutex_lock(&post_lock[next]);
            post(next, r);
            pthread_mutex_unlock(&post_lock[next]);
        } else {
            free(r);
        }
        free(keep[i % 64]);
        keep[i % 64] = s;
        if (i % 64 == 0) { pthread_mutex_lock(&post_lock[me]); drain(me); pthread_mutex_unlock(&post_lock[me]); }
    }
    for (int k = 0; k < 64; k++) free(keep[k]);
    return (void *)checksum;
}

int main(int argc, char **argv) {
    ops_per_thread = argc > 1 ? atol(argv[1]) : 1000000;
    for (int i = 0; i < THREADS; i++) pthread_mutex_init(&post_lock[i], 0);
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    pthread_t t[THREADS];
    for (long i = 0; i < THREADS; i++) pthread_create(&t[i], 0, worker, (void *)i);
    long sum = 0;
    for (int i = 0; i < THREADS; i++) { void *r; pthread_join(t[i], &r); sum += (long)r; }
    for (int i = 0; i < THREADS; i++) drain(i);
    clock_gettime(CLOCK_MONOTONIC, &b);
    double secs = (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9;
    printf("ops_per_sec=%.0f checksum=%ld\n", THREADS * ops_per_thread / secs, sum);
    return 0;
}
