/* Two-thread server with cross-thread frees.
 *
 * Two threads each serve `requests` requests. A request allocates the same four
 * objects every time (48, 32, 200 and 96 bytes: constant request sizes), writes them
 * and keeps them while the next `window` requests are served; then they are freed.
 * Every 8th object retired is not freed locally but handed to the other thread through
 * a queue (in batches of 32), and the other thread frees it (1/8 of all frees are
 * remote); each thread collects what it was sent every 8 requests.
 * Figure: malloc+free pairs per second for both threads together.
 */
#include "bench.h"

#define PARTS 4
static const size_t part_size[PARTS] = {48, 32, 200, 96};

#define BATCH 32

struct worker {
    int id;
    long requests;
    long window;
    struct spsc *out; /* to the other thread */
    struct spsc *in;  /* from the other thread */
    atomic_int *my_done;
    atomic_int *peer_done;
    void *pending[BATCH];
    size_t npending;
    long allocs, local_frees, remote_frees, received;
};

static struct spsc g_queue[2];
static atomic_int g_done[2];
static pthread_barrier_t g_start;

static void drain(struct worker *w) {
    void *got[64];
    size_t n;
    while ((n = spsc_pop_n(w->in, got, 64)) > 0) {
        for (size_t i = 0; i < n; i++) B_FREE(got[i]);
        w->received += (long)n;
    }
}

static void flush(struct worker *w) {
    unsigned spins = 0;
    while (w->npending && !spsc_push_n(w->out, w->pending, w->npending)) {
        drain(w);
        backoff(&spins);
    }
    w->npending = 0;
}

static void retire(struct worker *w, void **req, unsigned long *counter) {
    for (int j = 0; j < PARTS; j++) {
        if (++*counter % 8 == 0) {
            w->pending[w->npending++] = req[j];
            if (w->npending == BATCH) flush(w);
            w->remote_frees++;
        } else {
            B_FREE(req[j]);
            w->local_frees++;
        }
        req[j] = NULL;
    }
}

static void *serve(void *arg) {
    struct worker *w = arg;
    void **ring = B_MALLOC(sizeof(void *) * PARTS * (size_t)w->window);
    CHECK_ALLOC(ring, 0);
    memset(ring, 0, sizeof(void *) * PARTS * (size_t)w->window);
    unsigned long counter = (unsigned long)w->id * 3; /* the two threads are out of step */
    pthread_barrier_wait(&g_start);
    for (long i = 0; i < w->requests; i++) {
        if (i % 8 == 0) drain(w);
        void **req = &ring[(size_t)(i % w->window) * PARTS];
        if (req[0]) retire(w, req, &counter);
        /* one call site per part, each with a constant size, as request code is written */
        req[0] = B_MALLOC(48);
        req[1] = B_MALLOC(32);
        req[2] = B_MALLOC(200);
        req[3] = B_MALLOC(96);
        for (int j = 0; j < PARTS; j++) {
            CHECK_ALLOC(req[j], part_size[j]);
            touch(req[j], part_size[j]);
        }
        w->allocs += PARTS;
    }
    for (long i = 0; i < w->window; i++) {
        void **req = &ring[(size_t)i * PARTS];
        if (req[0]) retire(w, req, &counter);
    }
    flush(w);
    atomic_store_explicit(w->my_done, 1, memory_order_release);
    unsigned spins = 0;
    while (!atomic_load_explicit(w->peer_done, memory_order_acquire)) {
        drain(w);
        backoff(&spins);
    }
    drain(w);
    B_FREE(ring);
    return NULL;
}

int main(int argc, char **argv) {
    args_init(argc, argv);
    long requests = arg_long("requests", 6000000, 800000);
    long window = arg_long("window", 256, 256);
    struct worker w[2];
    memset(w, 0, sizeof w);
    pthread_barrier_init(&g_start, NULL, 3);
    pthread_t t[2];
    for (int i = 0; i < 2; i++) {
        w[i].id = i;
        w[i].requests = requests;
        w[i].window = window;
        w[i].out = &g_queue[i];
        w[i].in = &g_queue[1 - i];
        w[i].my_done = &g_done[i];
        w[i].peer_done = &g_done[1 - i];
        t[i] = start_thread(serve, &w[i], 0);
    }
    pthread_barrier_wait(&g_start);
    double t0 = now_s();
    for (int i = 0; i < 2; i++) pthread_join(t[i], NULL);
    double secs = now_s() - t0;

    long allocs = w[0].allocs + w[1].allocs;
    long frees = w[0].local_frees + w[1].local_frees + w[0].received + w[1].received;
    if (frees != allocs) die("server2: %ld allocations but %ld frees", allocs, frees);
    result_begin("server2");
    result_add("ops=%ld", allocs);
    result_add("remote_frees=%ld", w[0].remote_frees + w[1].remote_frees);
    result_add("time_s=%.6f", secs);
    result_add("mops_per_s=%.3f", (double)allocs / secs / 1e6);
    result_end();
    return 0;
}
