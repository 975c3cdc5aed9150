/* Many threads, each holding a few small objects of three sizes: prints resident
 * bytes per thread over the same number of threads that allocate nothing. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct small { long a; char b[8]; };      /* 16 */
struct medium { long a[5]; };             /* 40 */
struct node { struct node *next; long v[12]; };  /* 104 */

static pthread_barrier_t ready, done;
static int holding;

__attribute__((noinline)) static void *hold(void) {
    void *p[14];
    for (int i = 0; i < 14; i++) {
        switch (i % 3) {
        case 0: p[i] = malloc(sizeof(struct small)); memset(p[i], 1, sizeof(struct small)); break;
        case 1: p[i] = malloc(sizeof(struct medium)); memset(p[i], 1, sizeof(struct medium)); break;
        default: p[i] = malloc(sizeof(struct node)); memset(p[i], 1, sizeof(struct node)); break;
        }
    }
    pthread_barrier_wait(&ready);
    pthread_barrier_wait(&done);
    for (int i = 0; i < 14; i++) free(p[i]);
    return 0;
}

static void *idle(void) {
    volatile char pad[256];  /* similar stack depth */
    pad[0] = 1;
    pthread_barrier_wait(&ready);
    pthread_barrier_wait(&done);
    return (void *)(long)pad[0];
}

static void *run(void *arg) { (void)arg; return holding ? hold() : idle(); }

static long rss(void) {
    FILE *f = fopen("/proc/self/statm", "r");
    long size, res;
    if (fscanf(f, "%ld %ld", &size, &res) != 2) res = 0;
    fclose(f);
    return res * sysconf(_SC_PAGESIZE);
}

static long measure(int n, int hold_objects) {
    holding = hold_objects;
    pthread_barrier_init(&ready, 0, n + 1);
    pthread_barrier_init(&done, 0, n + 1);
    pthread_attr_t at;
    pthread_attr_init(&at);
    pthread_attr_setstacksize(&at, 64 * 1024);
    pthread_t *t = calloc(n, sizeof *t);
    for (int i = 0; i < n; i++) pthread_create(&t[i], &at, run, 0);
    pthread_barrier_wait(&ready);
    long r = rss();
    pthread_barrier_wait(&done);
    for (int i = 0; i < n; i++) pthread_join(t[i], 0);
    free(t);
    pthread_barrier_destroy(&ready);
    pthread_barrier_destroy(&done);
    return r;
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 500;
    measure(64, 1); /* warm up */
    long base = measure(n, 0);
    long with = measure(n, 1);
    printf("bytes_per_thread=%ld\n", (with - base) / n);
    return 0;
}
