/* Large allocations: 1..32 MiB blocks, allocated, used a little and freed.
 *
 * A window of `live` blocks; each step frees a random one and allocates a new block of
 * a log-uniform size between 1 and 32 MiB, writes one byte per 4 KiB page of its first
 * MiB and its last byte. Allocators that map and unmap every block pay for the system
 * calls and the page faults; those that keep freed mappings pay in resident memory.
 * Figures: allocations per second, page faults per allocation, peak RSS.
 */
#include <sys/resource.h>

#include "bench.h"

static size_t draw_size(uint64_t *rng) {
    double e = 20.0 + (double)(rng_next(rng) >> 11) / 9007199254740992.0 * 5.0;
    size_t t = (size_t)1 << (int)e;
    return t + (size_t)((double)t * (e - (int)e));
}

static void use(unsigned char *p, size_t n) {
    size_t head = n < (1u << 20) ? n : (1u << 20);
    for (size_t off = 0; off < head; off += 4096) p[off] = (unsigned char)off;
    p[n - 1] = 1;
}

int main(int argc, char **argv) {
    args_init(argc, argv);
    long ops = arg_long("ops", 5000, 1000);
    long live = arg_long("live", 8, 8);
    uint64_t rng = rng_seed(5);
    unsigned char **slot = calloc((size_t)live, sizeof *slot);
    if (!slot) die("large: out of memory");
    for (long i = 0; i < live; i++) {
        size_t n = draw_size(&rng);
        slot[i] = B_MALLOC(n);
        CHECK_ALLOC(slot[i], n);
        use(slot[i], n);
    }
    struct rusage ru0, ru1;
    getrusage(RUSAGE_SELF, &ru0);
    double t0 = now_s();
    for (long i = 0; i < ops; i++) {
        size_t k = (size_t)(rng_next(&rng) >> 40) % (size_t)live;
        size_t n = draw_size(&rng);
        B_FREE(slot[k]);
        slot[k] = B_MALLOC(n);
        CHECK_ALLOC(slot[k], n);
        use(slot[k], n);
    }
    double t = now_s() - t0;
    getrusage(RUSAGE_SELF, &ru1);
    for (long i = 0; i < live; i++) B_FREE(slot[i]);
    long rss_after_free = rss_kib();
    free(slot);

    result_begin("large");
    result_add("ops=%ld", ops);
    result_add("time_s=%.6f", t);
    result_add("kops_per_s=%.3f", (double)ops / t / 1e3);
    result_add("faults_per_op=%.1f", (double)(ru1.ru_minflt - ru0.ru_minflt) / (double)ops);
    result_add("rss_after_free_kib=%ld", rss_after_free);
    result_end();
    return 0;
}
