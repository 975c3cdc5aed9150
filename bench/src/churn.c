/* Single-thread small-object churn.
 *
 * A table of `live` objects; each step frees a random entry and allocates a new object
 * in its place, writing its first and last byte. `sizes=fixed` uses one size (`size`,
 * default 64 bytes, then passed as a constant at the call site); `sizes=random` draws
 * every size uniformly from 16..1024.
 * Figure: malloc+free pairs per second.
 */
#include "bench.h"

int main(int argc, char **argv) {
    args_init(argc, argv);
    const char *mode = arg_str("sizes", "fixed");
    int random_sizes = strcmp(mode, "random") == 0;
    long ops = arg_long("ops", 30000000, 3000000);
    long live = arg_long("live", 2048, 2048);
    size_t fixed = (size_t)arg_long("size", 64, 64);

    void **slot = B_MALLOC(sizeof(void *) * (size_t)live);
    size_t *len = B_MALLOC(sizeof(size_t) * (size_t)live);
    CHECK_ALLOC(slot, 0);
    CHECK_ALLOC(len, 0);
    uint64_t rng = rng_seed(1);
    for (long i = 0; i < live; i++) {
        size_t n = random_sizes ? rng_range(&rng, 16, 1024) : fixed;
        slot[i] = B_MALLOC(n);
        CHECK_ALLOC(slot[i], n);
        touch(slot[i], n);
        len[i] = n;
    }

    double t0 = now_s();
    for (long i = 0; i < ops; i++) {
        uint64_t r = rng_next(&rng);
        size_t k = (size_t)(r >> 40) % (size_t)live;
        size_t n = random_sizes ? 16 + (size_t)(r & 0xffff) % 1009 : fixed;
        B_FREE(slot[k]);
        /* the default fixed size from a call site with a constant, as `malloc(sizeof x)` */
        void *p = (!random_sizes && fixed == 64) ? B_MALLOC(64) : B_MALLOC(n);
        CHECK_ALLOC(p, n);
        touch(p, n);
        slot[k] = p;
        len[k] = n;
    }
    double t = now_s() - t0;

    long checksum = 0;
    for (long i = 0; i < live; i++) {
        checksum += ((unsigned char *)slot[i])[len[i] - 1];
        B_FREE(slot[i]);
    }
    B_FREE(slot);
    B_FREE(len);

    result_begin(random_sizes ? "churn-random" : "churn-fixed");
    result_add("ops=%ld", ops);
    result_add("time_s=%.6f", t);
    result_add("mops_per_s=%.3f", (double)ops / t / 1e6);
    result_add("check=%ld", checksum & 0xff);
    result_end();
    return 0;
}
