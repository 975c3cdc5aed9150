/* False sharing: do small objects used by different threads end up in one cache line?
 *
 * mode=active  (like Hoard's cache-thrash): each thread repeatedly allocates `group`
 *              (4) objects of 8 bytes, writes every byte of them `reps` times and frees
 *              them. An allocator that hands neighbouring blocks to different threads
 *              makes the cores fight over the line.
 * mode=passive (like Hoard's cache-scratch): the main thread allocates `group` 8-byte
 *              objects per thread, back to back and dealt out in turn, so neighbours
 *              belong to different threads. Each thread frees its objects first, then
 *              runs the active loop. An allocator that reuses the freed (neighbouring)
 *              blocks for the freeing thread shares lines between threads although no
 *              thread ever allocated next to another.
 * Figures: time, and `shared_lines`, the number of cache lines that held objects of
 * two different threads (0 means no false sharing was possible).
 */
#include "bench.h"

#define MAX_THREADS 8
#define MAX_GROUP 8
#define MAX_ITER 16384

struct rec {
    uintptr_t line;
    int tid;
};

static int g_passive;
static long g_iter, g_reps, g_group;
static size_t g_objsize;
static void *g_given[MAX_THREADS][MAX_GROUP];
static uintptr_t g_addr[MAX_THREADS][MAX_ITER * MAX_GROUP];
static pthread_barrier_t g_start, g_end;

static void *worker(void *arg) {
    int tid = (int)(intptr_t)arg;
    if (g_passive)
        for (long k = 0; k < g_group; k++) B_FREE(g_given[tid][k]);
    pthread_barrier_wait(&g_start);
    volatile unsigned char *p[MAX_GROUP];
    for (long it = 0; it < g_iter; it++) {
        for (long k = 0; k < g_group; k++) {
            p[k] = B_MALLOC(g_objsize);
            CHECK_ALLOC(p[k], g_objsize);
            g_addr[tid][it * g_group + k] = (uintptr_t)p[k];
        }
        for (long r = 0; r < g_reps; r++)
            for (long k = 0; k < g_group; k++)
                for (size_t b = 0; b < g_objsize; b++) p[k][b]++;
        for (long k = 0; k < g_group; k++) B_FREE((void *)p[k]);
    }
    /* No thread exits before all are done: a heap left by an exited thread could be
     * reused by another, which would count as sharing that never overlapped in time. */
    pthread_barrier_wait(&g_end);
    return NULL;
}

static int by_line(const void *a, const void *b) {
    const struct rec *x = a, *y = b;
    if (x->line != y->line) return x->line < y->line ? -1 : 1;
    return x->tid - y->tid;
}

int main(int argc, char **argv) {
    args_init(argc, argv);
    g_passive = strcmp(arg_str("mode", "active"), "passive") == 0;
    long threads = arg_long("threads", 2, 2);
    g_iter = arg_long("iterations", 1000, 200);
    g_reps = arg_long("reps", 10000, 10000);
    g_group = arg_long("group", 4, 4);
    g_objsize = (size_t)arg_long("objsize", 8, 8);
    if (threads < 1 || threads > MAX_THREADS || g_iter < 1 || g_iter > MAX_ITER ||
        g_group < 1 || g_group > MAX_GROUP || g_objsize < 1)
        die("falseshare: threads 1..%d, iterations 1..%d, group 1..%d", MAX_THREADS,
            MAX_ITER, MAX_GROUP);

    /* dealt out in turn: neighbouring blocks go to different threads */
    for (long k = 0; k < g_group; k++)
        for (long t = 0; t < threads; t++) {
            g_given[t][k] = B_MALLOC(g_objsize);
            CHECK_ALLOC(g_given[t][k], g_objsize);
            memset(g_given[t][k], 0, g_objsize);
        }
    if (!g_passive)
        for (long k = 0; k < g_group; k++)
            for (long t = 0; t < threads; t++) B_FREE(g_given[t][k]);

    pthread_barrier_init(&g_start, NULL, (unsigned)threads + 1);
    pthread_barrier_init(&g_end, NULL, (unsigned)threads);
    pthread_t th[MAX_THREADS];
    for (long t = 0; t < threads; t++) th[t] = start_thread(worker, (void *)(intptr_t)t, 0);
    pthread_barrier_wait(&g_start);
    double t0 = now_s();
    for (long t = 0; t < threads; t++) pthread_join(th[t], NULL);
    double secs = now_s() - t0;

    /* Count cache lines touched by objects of more than one thread. */
    size_t n = 0, cap = (size_t)threads * (size_t)g_iter * (size_t)g_group * 2;
    struct rec *r = calloc(cap, sizeof *r);
    if (!r) die("falseshare: out of memory");
    for (long t = 0; t < threads; t++)
        for (long i = 0; i < g_iter * g_group; i++) {
            uintptr_t a = g_addr[t][i];
            r[n++] = (struct rec){a / CACHE_LINE, (int)t};
            if ((a + g_objsize - 1) / CACHE_LINE != a / CACHE_LINE)
                r[n++] = (struct rec){(a + g_objsize - 1) / CACHE_LINE, (int)t};
        }
    qsort(r, n, sizeof *r, by_line);
    long shared = 0;
    for (size_t i = 0; i < n;) {
        size_t j = i + 1;
        int multi = 0;
        while (j < n && r[j].line == r[i].line) {
            if (r[j].tid != r[i].tid) multi = 1;
            j++;
        }
        shared += multi;
        i = j;
    }
    free(r);

    result_begin(g_passive ? "false-passive" : "false-active");
    result_add("threads=%ld", threads);
    result_add("writes=%ld", threads * g_iter * g_reps * g_group * (long)g_objsize);
    result_add("time_s=%.6f", secs);
    result_add("shared_lines=%ld", shared);
    result_end();
    return 0;
}
