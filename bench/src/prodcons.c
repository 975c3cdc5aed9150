/* Pure producer/consumer: one thread only allocates, the other only frees.
 *
 * The producer allocates `objects` objects of 16..256 bytes, writes them and passes
 * them through a lock-free queue (4096 entries, batches of 32); the consumer reads each
 * and frees it.
 * Every free is a remote free, and the producer's memory only comes back through them.
 * Figure: objects per second.
 */
#include "bench.h"

static struct spsc g_q;
static atomic_int g_producer_done;
static pthread_barrier_t g_start;
static long g_objects;
static long g_consumed;
static long g_sum;

#define BATCH 32

static void *producer(void *arg) {
    (void)arg;
    uint64_t rng = rng_seed(3);
    void *batch[BATCH];
    size_t n = 0;
    pthread_barrier_wait(&g_start);
    for (long i = 0; i < g_objects; i++) {
        size_t len = rng_range(&rng, 16, 256);
        unsigned char *p = B_MALLOC(len);
        CHECK_ALLOC(p, len);
        p[0] = (unsigned char)i;
        p[len - 1] = 1;
        batch[n++] = p;
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

int main(int argc, char **argv) {
    args_init(argc, argv);
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
