/* Many idle threads holding a few objects: resident memory per thread.
 *
 * `threads` threads (500) with 64 KiB stacks start, each touches the same 16 KiB of its
 * stack and, with mode=alloc, allocates and writes 14 small objects (5 x 24, 5 x 56 and
 * 4 x 120 bytes); then all wait. With every thread waiting, the main thread reads its
 * RSS from /proc/self/statm and prints the growth since before the threads started.
 * mode=idle does the same without allocating: the baseline. The runner reports
 *     (growth(alloc) - growth(idle)) / threads
 * as the allocator's resident bytes per thread.
 */
#include "bench.h"

#define MAX_THREADS 4096
#define HELD 14
#define STACK_TOUCH (16 * 1024)

static int g_alloc;
static long g_threads;
static void *g_held[MAX_THREADS][HELD];
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_all_ready = PTHREAD_COND_INITIALIZER;
static pthread_cond_t g_go = PTHREAD_COND_INITIALIZER;
static long g_ready;
static int g_released;

__attribute__((noinline)) static void touch_stack(void) {
    volatile char buf[STACK_TOUCH];
    for (size_t i = 0; i < sizeof buf; i += 256) buf[i] = (char)i;
    __asm__ volatile("" : : "r"(buf) : "memory");
}

static size_t held_size(int k) { return k < 5 ? 24 : k < 10 ? 56 : 120; }

static void *body(void *arg) {
    long id = (long)(intptr_t)arg;
    touch_stack();
    if (g_alloc) {
        for (int k = 0; k < HELD; k++) {
            size_t n = held_size(k);
            void *p = B_MALLOC(n);
            CHECK_ALLOC(p, n);
            memset(p, (int)k, n);
            g_held[id][k] = p;
        }
    }
    pthread_mutex_lock(&g_lock);
    if (++g_ready == g_threads) pthread_cond_signal(&g_all_ready);
    while (!g_released) pthread_cond_wait(&g_go, &g_lock);
    pthread_mutex_unlock(&g_lock);
    if (g_alloc)
        for (int k = 0; k < HELD; k++) B_FREE(g_held[id][k]);
    return NULL;
}

int main(int argc, char **argv) {
    args_init(argc, argv);
    g_alloc = strcmp(arg_str("mode", "alloc"), "idle") != 0;
    long threads = arg_long("threads", 500, 500);
    long stack = arg_long("stack", 64 * 1024, 64 * 1024);
    if (threads < 1 || threads > MAX_THREADS) die("threads_idle: threads 1..%d", MAX_THREADS);
    static pthread_t t[MAX_THREADS];

    /* Warm up: the main thread uses the sizes, and one thread runs the body, so that
     * one-time set-up (global structures, the first extra thread) is not counted. */
    for (int k = 0; k < HELD; k++) {
        void *p = B_MALLOC(held_size(k));
        CHECK_ALLOC(p, held_size(k));
        touch(p, held_size(k));
        B_FREE(p);
    }
    g_threads = 1;
    g_released = 1;
    pthread_t w = start_thread(body, (void *)(intptr_t)0, (size_t)stack);
    pthread_join(w, NULL);
    g_ready = 0;
    g_released = 0;
    g_threads = threads;

    long rss0 = rss_kib();
    double t0 = now_s();
    for (long i = 0; i < threads; i++) t[i] = start_thread(body, (void *)(intptr_t)i, (size_t)stack);
    pthread_mutex_lock(&g_lock);
    while (g_ready < threads) pthread_cond_wait(&g_all_ready, &g_lock);
    pthread_mutex_unlock(&g_lock);
    double t1 = now_s();
    long rss1 = rss_kib();
    pthread_mutex_lock(&g_lock);
    g_released = 1;
    pthread_cond_broadcast(&g_go);
    pthread_mutex_unlock(&g_lock);
    for (long i = 0; i < threads; i++) pthread_join(t[i], NULL);
    double t2 = now_s();

    result_begin(g_alloc ? "idle-threads" : "idle-baseline");
    result_add("threads=%ld", threads);
    result_add("time_s=%.6f", t2 - t0);
    result_add("start_s=%.6f", t1 - t0);
    result_add("growth_kib=%ld", rss1 - rss0);
    result_add("per_thread_b=%.0f", (double)(rss1 - rss0) * 1024.0 / (double)threads);
    result_end();
    return 0;
}
