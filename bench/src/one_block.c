/* The tightest loop: one block of 32 bytes allocated, written and freed, again and
 * again. Each malloc takes the block the previous free gave back, so the time per pair
 * is the latency of that round trip through the allocator (free's page lookup, the
 * push, the pop), where the `hardened` feature's decode sits on the chain; hotpath.c,
 * with 64 live blocks of mixed sizes, measures throughput instead.
 */
#include "bench.h"

__attribute__((noinline)) void run_pairs(long pairs) {
    for (long i = 0; i < pairs; i++) {
        void *p = B_MALLOC(32);
        *(volatile char *)p = 1;
        B_FREE(p);
    }
}

int main(int argc, char **argv) {
    args_init(argc, argv);
    long pairs = arg_long("pairs", 50000000, 5000000);
    void *first = B_MALLOC(32);
    CHECK_ALLOC(first, 32);
    B_FREE(first);
    run_pairs(pairs / 10); /* warm up */
    double t0 = now_s();
    run_pairs(pairs);
    double t1 = now_s();

    result_begin("one_block");
    result_add("pairs=%ld", pairs);
    result_add("ns_per_pair=%.3f", (t1 - t0) / (double)pairs * 1e9);
    result_add("time_s=%.6f", t1 - t0);
    result_end();
    return 0;
}
