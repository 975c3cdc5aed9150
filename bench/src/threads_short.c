/* Many short-lived threads.
 *
 * Threads are started in waves of `wave` (default 4) and joined; `threads` in all.
 * Each allocates 64 objects of 16..512 bytes, frees 60 of them and leaves 4 behind for
 * the main thread, which frees them after the join (objects that outlive their thread).
 * Figures: threads per second, and RSS growth over the run after all is freed (memory
 * that exited threads left behind).
 */
#include "bench.h"

#define PER_THREAD 64
#define LEFT 4

struct job {
    uint64_t seed;
    void *left[LEFT];
};

static void *body(void *arg) {
    struct job *j = arg;
    uint64_t rng = j->seed;
    void *obj[PER_THREAD];
    for (int i = 0; i < PER_THREAD; i++) {
        size_t n = rng_range(&rng, 16, 512);
        obj[i] = B_MALLOC(n);
        CHECK_ALLOC(obj[i], n);
        touch(obj[i], n);
    }
    for (int i = 0; i < PER_THREAD - LEFT; i++) B_FREE(obj[i]);
    for (int i = 0; i < LEFT; i++) j->left[i] = obj[PER_THREAD - LEFT + i];
    return NULL;
}

int main(int argc, char **argv) {
    args_init(argc, argv);
    long threads = arg_long("threads", 15000, 2000);
    long wave = arg_long("wave", 4, 4);
    if (wave < 1 || wave > 64) die("threads_short: wave 1..64");
    struct job job[64];
    pthread_t t[64];

    /* one wave first, so that one-time set-up is not counted as growth */
    for (long i = 0; i < wave; i++) {
        job[i].seed = rng_seed((uint64_t)i);
        t[i] = start_thread(body, &job[i], 128 * 1024);
    }
    for (long i = 0; i < wave; i++) {
        pthread_join(t[i], NULL);
        for (int k = 0; k < LEFT; k++) B_FREE(job[i].left[k]);
    }
    long rss0 = rss_kib();

    double t0 = now_s();
    long started = 0;
    while (started < threads) {
        long n = threads - started < wave ? threads - started : wave;
        for (long i = 0; i < n; i++) {
            job[i].seed = rng_seed((uint64_t)(started + i + 1000));
            t[i] = start_thread(body, &job[i], 128 * 1024);
        }
        for (long i = 0; i < n; i++) {
            pthread_join(t[i], NULL);
            for (int k = 0; k < LEFT; k++) B_FREE(job[i].left[k]);
        }
        started += n;
    }
    double secs = now_s() - t0;
    long rss1 = rss_kib();

    result_begin("short-threads");
    result_add("threads=%ld", threads);
    result_add("time_s=%.6f", secs);
    result_add("kthreads_per_s=%.3f", (double)threads / secs / 1e3);
    result_add("rss_growth_kib=%ld", rss1 - rss0);
    result_end();
    return 0;
}
