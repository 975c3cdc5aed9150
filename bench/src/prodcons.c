/* Pure producer/consumer: one thread only allocates, the other only frees.
 *
 * The producer allocates `objects` objects of 16..256 bytes, writes them and passes
 * them through a lock-free queue (4096 entries, batches of 32); the consumer reads each
 * and frees it.
 * Every free is a remote free, and the producer's memory only comes back through them.
 * Figure: objects per second.
 *
 * `threads=N` (1..64) runs a ring instead, for the thread-scaling benchmark: each of N
 * threads allocates its share of `objects` x min(N, cores) objects (`objects` is then
 * 4M per core, quick 1M) and passes them to its successor (thread
 * i -> i+1 mod N), and frees what its predecessor passes to it, so N producer/consumer
 * pairs run at once and every free is remote (with N = 1 a thread frees its own
 * objects). A thread whose outgoing queue is full keeps draining its incoming one, so
 * the ring cannot deadlock.
 */
#include "bench.h"

static struct spsc g_q;
static atomic_int g_producer_done;
static pthread_barrier_t g_start;
static long g_objects;
static long g_consumed;
static long g_sum;

#define BATCH 32

/* One object of 16-256 bytes, its first and last byte written. */
static void *new_object(uint64_t *rng, long i) {
    size_t len = rng_range(rng, 16, 256);
    unsigned char *p = B_MALLOC(len);
    CHECK_ALLOC(p, len);
    p[0] = (unsigned char)i;
    p[len - 1] = 1;
    return p;
}

static void *producer(void *arg) {
    (void)arg;
    uint64_t rng = rng_seed(3);
    void *batch[BATCH];
    size_t n = 0;
    pthread_barrier_wait(&g_start);
    for (long i = 0; i < g_objects; i++) {
        batch[n++] = new_object(&rng, i);
        if (n == BATCH || i == g_objects - 1) {
            unsigned spins = 0;
            while (!spsc_push_n(&g_q, batch, n)) backoff(&spins);
            n = 0;
        }
    }
    atomic_store_explicit(&g_producer_done, 1, memory_order_release);
    return NULL;
}

static long consume(long *sum) {
    void *got[64];
    size_t n = spsc_pop_n(&g_q, got, 64);
    for (size_t i = 0; i < n; i++) {
        *sum += ((unsigned char *)got[i])[0];
        B_FREE(got[i]);
    }
    return (long)n;
}

static void *consumer(void *arg) {
    (void)arg;
    long got = 0, sum = 0;
    unsigned spins = 0;
    pthread_barrier_wait(&g_start);
    for (;;) {
        long n = consume(&sum);
        if (n) {
            got += n;
            spins = 0;
            continue;
        }
        if (atomic_load_explicit(&g_producer_done, memory_order_acquire)) {
            while ((n = consume(&sum)) > 0) got += n;
            break;
        }
        backoff(&spins);
    }
    g_consumed = got;
    g_sum = sum;
    return NULL;
}

/* ---- the ring (threads=N) -------------------------------------------------------- */

#define RING_MAX 64

static struct spsc g_ring[RING_MAX]; /* g_ring[i]: what thread i receives */
static long g_ring_threads;
static long g_ring_each;
static atomic_long g_ring_sum;

/* Frees what arrived in thread `me`'s queue; returns how many. */
static long ring_drain(long me, long *sum) {
    void *got[64];
    size_t n = spsc_pop_n(&g_ring[me], got, 64);
    for (size_t i = 0; i < n; i++) {
        *sum += ((unsigned char *)got[i])[0];
        B_FREE(got[i]);
    }
    return (long)n;
}

static void *ring_member(void *arg) {
    long me = (long)(intptr_t)arg;
    struct spsc *out = &g_ring[(me + 1) % g_ring_threads];
    uint64_t rng = rng_seed(1000 + (uint64_t)me);
    void *batch[BATCH];
    size_t n = 0;
    long got = 0, sum = 0;
    pthread_barrier_wait(&g_start);
    for (long i = 0; i < g_ring_each; i++) {
        batch[n++] = new_object(&rng, i);
        if (n == BATCH || i == g_ring_each - 1) {
            unsigned spins = 0;
            while (!spsc_push_n(out, batch, n)) {
                long d = ring_drain(me, &sum);
                got += d;
                if (!d) backoff(&spins);
            }
            n = 0;
        }
        if ((i & 7) == 7) got += ring_drain(me, &sum);
    }
    unsigned spins = 0;
    while (got < g_ring_each) {
        long d = ring_drain(me, &sum);
        got += d;
        if (d) spins = 0; else backoff(&spins);
    }
    atomic_fetch_add(&g_ring_sum, sum);
    return NULL;
}

static int run_ring(long threads) {
    if (threads > RING_MAX) die("prodcons: at most %d threads", RING_MAX);
    g_ring_threads = threads;
    g_ring_each = g_objects / threads;
    pthread_t t[RING_MAX];
    pthread_barrier_init(&g_start, NULL, (unsigned)threads + 1);
    for (long i = 0; i < threads; i++) t[i] = start_thread(ring_member, (void *)(intptr_t)i, 0);
    pthread_barrier_wait(&g_start);
    double t0 = now_s();
    for (long i = 0; i < threads; i++) pthread_join(t[i], NULL);
    double secs = now_s() - t0;
    long ops = g_ring_each * threads;

    result_begin("prodcons-ring");
    result_add("threads=%ld", threads);
    result_add("cores=%ld", sysconf(_SC_NPROCESSORS_ONLN));
    result_add("ops=%ld", ops);
    result_add("time_s=%.6f", secs);
    result_add("mops_per_s=%.3f", (double)ops / secs / 1e6);
    result_add("check=%ld", atomic_load(&g_ring_sum) & 0xff);
    result_end();
    return 0;
}

int main(int argc, char **argv) {
    args_init(argc, argv);
    long threads = arg_long("threads", 0, 0);
    if (threads > 0) {
        long cores = sysconf(_SC_NPROCESSORS_ONLN);
        g_objects = arg_long("objects", 4000000, 1000000) * (threads < cores ? threads : cores);
        return run_ring(threads);
    }
    g_objects = arg_long("objects", 16000000, 3000000);
    pthread_barrier_init(&g_start, NULL, 3);
    pthread_t c = start_thread(consumer, NULL, 0);
    pthread_t p = start_thread(producer, NULL, 0);
    pthread_barrier_wait(&g_start);
    double t0 = now_s();
    pthread_join(p, NULL);
    pthread_join(c, NULL);
    double t = now_s() - t0;
    if (g_consumed != g_objects) die("prodcons: produced %ld, consumed %ld", g_objects, g_consumed);

    result_begin("prodcons");
    result_add("ops=%ld", g_objects);
    result_add("time_s=%.6f", t);
    result_add("mops_per_s=%.3f", (double)g_objects / t / 1e6);
    result_add("check=%ld", g_sum & 0xff);
    result_end();
    return 0;
}
