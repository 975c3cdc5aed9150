/* mimalloc-bench's malloc-large, rewritten: big buffers, fully written, replaced at random.
 *
 * 20 slots; each step picks a random slot and a size uniform in [5 MiB, 25 MiB],
 * allocates a buffer of that size, zeroes all of it, and only then frees the buffer the
 * slot held (the order of `slot = std::make_unique<char[]>(n)` in the original, so up to
 * 21 buffers are live). 2000 steps (300 with --quick). Every byte of every buffer is
 * written, so an allocator that hands back a mapping the kernel must fault in again
 * pays one page fault per 4 KiB; one that reuses resident memory pays only the memset.
 * Figures: wall time of the loop, page faults per step, RSS after freeing everything.
 */
#include <sys/resource.h>

#include "bench.h"

#define SLOTS 20

/* Through a volatile pointer so the compiler cannot fuse malloc + memset into calloc:
 * the original zeroes with `new char[n]()`, which no allocator sees as calloc. */
static void *(*volatile zero_bytes)(void *, int, size_t) = memset;

int main(int argc, char **argv) {
    args_init(argc, argv);
    long steps = arg_long("steps", 2000, 300);
    size_t lo = (size_t)arg_long("min_mib", 5, 5) << 20;
    size_t hi = (size_t)arg_long("max_mib", 25, 25) << 20;
    uint64_t rng = rng_seed(42);
    unsigned char *slot[SLOTS] = {0};

    struct rusage ru0, ru1;
    getrusage(RUSAGE_SELF, &ru0);
    double t0 = now_s();
    for (long i = 0; i < steps; i++) {
        size_t k = (size_t)rng_range(&rng, 0, SLOTS - 1);
        size_t n = rng_range(&rng, lo, hi);
        unsigned char *p = B_MALLOC(n);
        CHECK_ALLOC(p, n);
        zero_bytes(p, 0, n);
        B_FREE(slot[k]);
        slot[k] = p;
    }
    double t = now_s() - t0;
    getrusage(RUSAGE_SELF, &ru1);
    for (int i = 0; i < SLOTS; i++) B_FREE(slot[i]);
    long rss_after_free = rss_kib();

    result_begin("malloc-large");
    result_add("steps=%ld", steps);
    result_add("time_s=%.6f", t);
    result_add("faults_per_step=%.1f", (double)(ru1.ru_minflt - ru0.ru_minflt) / (double)steps);
    result_add("rss_after_free_kib=%ld", rss_after_free);
    result_end();
    return 0;
}
