/* Memory retention after a peak: how much RSS stays once everything is freed?
 *
 * The main thread and a helper thread (which then exits) allocate `mib` MiB in objects
 * of mixed sizes (85% 16..256 bytes, 13% up to 4 KiB, 2% up to 64 KiB), all written.
 * Then the main thread frees everything in random order and reads its RSS from
 * /proc/self/statm right away and again after 200 ms with a little allocator activity.
 * Figures (KiB above the RSS before the peak): peak, retained right after the frees,
 * retained later; and retained as a percentage of the peak.
 */
#include <sys/mman.h>

#include "bench.h"

static void **g_obj;
static long g_count;

struct part {
    long from, to;
    uint64_t seed;
};

static size_t draw_size(uint64_t *rng) {
    unsigned r = (unsigned)(rng_next(rng) % 100);
    if (r < 85) return rng_range(rng, 16, 256);
    if (r < 98) return rng_range(rng, 257, 4096);
    return rng_range(rng, 4097, 65536);
}

static void *fill(void *arg) {
    struct part *p = arg;
    uint64_t rng = p->seed;
    for (long i = p->from; i < p->to; i++) {
        size_t n = draw_size(&rng);
        unsigned char *q = B_MALLOC(n);
        CHECK_ALLOC(q, n);
        memset(q, (int)(i & 0xff), n);
        g_obj[i] = q;
    }
    return NULL;
}

static void *map_array(size_t bytes) {
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) die("retention: mmap failed");
    memset(p, 0, bytes);
    return p;
}

int main(int argc, char **argv) {
    args_init(argc, argv);
    long mib = arg_long("mib", 256, 64);
    /* mean object size is about 1.1 KiB */
    g_count = mib * 1024 * 1024 / 1100;
    g_obj = map_array(sizeof(void *) * (size_t)g_count);
    long *order = map_array(sizeof(long) * (size_t)g_count);
    uint64_t rng = rng_seed(9);
    for (long i = 0; i < g_count; i++) order[i] = i;
    for (long i = g_count - 1; i > 0; i--) {
        long j = (long)(rng_next(&rng) % (uint64_t)(i + 1));
        long x = order[i];
        order[i] = order[j];
        order[j] = x;
    }
    warm_up_allocator();
    long rss0 = rss_kib();

    double t0 = now_s();
    long split = g_count / 4;
    struct part helper = {0, split, rng_seed(21)}, mine = {split, g_count, rng_seed(22)};
    pthread_t h = start_thread(fill, &helper, 0);
    fill(&mine);
    pthread_join(h, NULL);
    double t1 = now_s();
    long rss_peak = rss_kib();

    for (long i = 0; i < g_count; i++) B_FREE(g_obj[order[i]]);
    double t2 = now_s();
    long rss_after = rss_kib();

    for (int round = 0; round < 4; round++) {
        struct timespec ts = {0, 50 * 1000 * 1000};
        nanosleep(&ts, NULL);
        for (int i = 0; i < 256; i++) {
            void *p = B_MALLOC(16 + (size_t)i * 8);
            CHECK_ALLOC(p, 16);
            touch(p, 16 + (size_t)i * 8);
            B_FREE(p);
        }
    }
    long rss_later = rss_kib();

    long peak = rss_peak - rss0;
    result_begin("retention");
    result_add("objects=%ld", g_count);
    result_add("time_s=%.6f", (t1 - t0) + (t2 - t1));
    result_add("peak_kib=%ld", peak);
    result_add("retained_kib=%ld", rss_after - rss0);
    result_add("retained_later_kib=%ld", rss_later - rss0);
    result_add("retained_pct=%.1f", peak > 0 ? 100.0 * (double)(rss_after - rss0) / (double)peak : 0.0);
    result_add("retained_later_pct=%.1f", peak > 0 ? 100.0 * (double)(rss_later - rss0) / (double)peak : 0.0);
    result_end();
    return 0;
}
