/* Hot path cost: malloc+free pairs with 64 live objects of sizes 16..256.
 *
 * Meant for instruction counts: the runner runs it under
 *   valgrind --tool=callgrind --toggle-collect=run_pairs --toggle-collect=run_empty
 * and computes, per pair,
 *   (inclusive(run_pairs) - 1.1 * inclusive(run_empty)) / (1.1 * pairs)
 * since run_pairs runs 1.1 * pairs times in all (a 10% warm-up, then the measured
 * pairs) and run_empty, the same loop without allocator calls, runs pairs times.
 * Run natively it also prints the time per pair.
 */
#include "bench.h"

#define LIVE 64

__attribute__((noinline)) void run_pairs(void **slots, long pairs) {
    uint32_t x = 12345;
    for (long i = 0; i < pairs; i++) {
        x = x * 1103515245u + 12345u;
        unsigned k = (x >> 8) % LIVE;
        size_t size = 16 + ((x >> 20) % 241);
        B_FREE(slots[k]);
        slots[k] = B_MALLOC(size);
        *(volatile char *)slots[k] = 1;
    }
}

/* The same loop without allocator calls, to subtract the loop's own cost. */
__attribute__((noinline)) void run_empty(void **slots, long pairs) {
    uint32_t x = 12345;
    for (long i = 0; i < pairs; i++) {
        x = x * 1103515245u + 12345u;
        unsigned k = (x >> 8) % LIVE;
        size_t size = 16 + ((x >> 20) % 241);
        __asm__ volatile("" : : "r"(slots[k]), "r"(size));
        *(volatile char *)slots[k] = 1;
    }
}

int main(int argc, char **argv) {
    args_init(argc, argv);
    long pairs = arg_long("pairs", 1000000, 200000);
    void *slots[LIVE];
    for (int i = 0; i < LIVE; i++) {
        slots[i] = B_MALLOC(16 + i * 3);
        CHECK_ALLOC(slots[i], 16 + i * 3);
    }
    run_pairs(slots, pairs / 10); /* warm up */
    double t0 = now_s();
    run_pairs(slots, pairs);
    double t1 = now_s();
    run_empty(slots, pairs);
    double t2 = now_s();
    for (int i = 0; i < LIVE; i++) B_FREE(slots[i]);

    result_begin("hotpath");
    result_add("pairs=%ld", pairs);
    result_add("ns_per_pair=%.3f", ((t1 - t0) - (t2 - t1)) / (double)pairs * 1e9);
    result_add("time_s=%.6f", t1 - t0);
    result_end();
    return 0;
}
