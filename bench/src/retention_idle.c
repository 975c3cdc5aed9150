/* Memory a program keeps after it moves on: tables of many sizes built and dropped.
 *
 * An interpreter or a server builds tables of many sizes for a while (hash tables,
 * arrays, buffers: each of 8 KiB to 4 MiB, so each in a different size class or a
 * mapping of its own), drops them all, then goes on with small-object work only.
 * How much of the memory those tables touched stays resident once the allocator's
 * delays have passed? RSS from /proc/self/statm right after the last table is freed,
 * and again after `idle_ms` of small-object work (allocating and freeing a few small
 * objects every millisecond, which is when an allocator gets to look at its clocks).
 * Figures (KiB above the RSS before the tables): peak, retained right after, retained
 * after the idle work; and the later figure as a percentage of the peak.
 */
#include "bench.h"

#define MAX_LIVE 64

int main(int argc, char **argv) {
    args_init(argc, argv);
    long rounds = arg_long("rounds", 400, 100);
    long idle_ms = arg_long("idle_ms", 1000, 600);

    warm_up_allocator();
    long rss0 = rss_kib();
    long peak = rss0;

    /* Each round builds a table of a random size, written whole; up to MAX_LIVE stay
     * live at once, the oldest dropped first, as a working set that moves on. */
    static void *live[MAX_LIVE];
    uint64_t rng = rng_seed(31);
    double t0 = now_s();
    for (long r = 0; r < rounds; r++) {
        unsigned pick = (unsigned)(rng_next(&rng) % 100);
        size_t n = pick < 80 ? rng_range(&rng, 8 << 10, 256 << 10) : rng_range(&rng, 256 << 10, 4 << 20);
        void **slot = &live[r % MAX_LIVE];
        if (*slot) B_FREE(*slot);
        *slot = B_MALLOC(n);
        CHECK_ALLOC(*slot, n);
        memset(*slot, (int)(r & 0xff), n);
        if (r % 16 == 0) {
            long now = rss_kib();
            if (now > peak) peak = now;
        }
    }
    long now = rss_kib();
    if (now > peak) peak = now;
    for (int i = 0; i < MAX_LIVE; i++) {
        if (live[i]) B_FREE(live[i]);
        live[i] = NULL;
    }
    double t1 = now_s();
    long rss_after = rss_kib();

    /* Small-object work only, a little every millisecond. */
    double until = now_s() + (double)idle_ms / 1000.0;
    while (now_s() < until) {
        struct timespec ts = {0, 1000 * 1000};
        nanosleep(&ts, NULL);
        for (int i = 0; i < 16; i++) {
            size_t sz = 16 + (size_t)(rng_next(&rng) % 512);
            void *p = B_MALLOC(sz);
            CHECK_ALLOC(p, sz);
            touch(p, sz);
            B_FREE(p);
        }
    }
    long rss_later = rss_kib();

    long grown = peak - rss0;
    result_begin("retention-idle");
    result_add("rounds=%ld", rounds);
    result_add("time_s=%.6f", t1 - t0);
    result_add("peak_kib=%ld", grown);
    result_add("retained_kib=%ld", rss_after - rss0);
    result_add("retained_later_kib=%ld", rss_later - rss0);
    result_add("retained_later_pct=%.1f", grown > 0 ? 100.0 * (double)(rss_later - rss0) / (double)grown : 0.0);
    result_end();
    return 0;
}
