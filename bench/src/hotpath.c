/* Hot path cost: malloc+free pairs with 64 live objects of sizes 16..256.
 * Built three ways (lgmalloc's lg_* API, mimalloc's mi_* API, the libc malloc) and
 * measured with callgrind, counting only run_pairs(). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#if defined(USE_LG)
#include "lgmalloc.h"
#define ALLOC lg_malloc
#define FREE lg_free
#define NAME "lgmalloc"
#elif defined(USE_MI)
#include <mimalloc.h>
#define ALLOC mi_malloc
#define FREE mi_free
#define NAME "mimalloc"
#else
#define ALLOC malloc
#define FREE free
#define NAME "libc"
#endif

#define LIVE 64

__attribute__((noinline)) void run_pairs(void **slots, long pairs) {
    uint32_t x = 12345;
    for (long i = 0; i < pairs; i++) {
        x = x * 1103515245u + 12345u;
        unsigned k = (x >> 8) % LIVE;
        size_t size = 16 + ((x >> 20) % 241);
        FREE(slots[k]);
        slots[k] = ALLOC(size);
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
    long pairs = argc > 1 ? atol(argv[1]) : 1000000;
    void *slots[LIVE];
    for (int i = 0; i < LIVE; i++) slots[i] = ALLOC(16 + i * 3);
    run_pairs(slots, pairs / 10); /* warm up */
    run_pairs(slots, pairs);
    run_empty(slots, pairs);
    for (int i = 0; i < LIVE; i++) FREE(slots[i]);
    printf("%s pairs=%ld\n", NAME, pairs);
    return 0;
}
