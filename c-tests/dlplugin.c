/* A shared library loaded and unloaded by dlopen.c. It allocates in its constructor,
 * destructor and exported functions, frees blocks made by the host and hands blocks to
 * the host that outlive the library. Compiled with the same USE_LIBC_MALLOC as its host.
 */
#define _GNU_SOURCE
#include <string.h>

#include "check.h"

static void *ctor_block;

__attribute__((constructor)) static void plugin_init(void) {
    ctor_block = T_MALLOC(333);
    if (ctor_block)
        memset(ctor_block, 0x33, 333);
}

__attribute__((destructor)) static void plugin_fini(void) {
    unsigned char *b = ctor_block;
    if (b && (b[0] != 0x33 || b[332] != 0x33))
        fprintf(stderr, "dlplugin: constructor block corrupt at unload\n");
    T_FREE(ctor_block);
    void *p = T_MALLOC(77); /* allocating while the library is being unloaded */
    T_FREE(p);
}

/* Allocate, check and free a mix of blocks; returns the number of problems. */
__attribute__((visibility("default"))) int plugin_churn(unsigned seed) {
    enum { N = 512 };
    void *p[N];
    size_t sz[N];
    uint64_t rng = (uint64_t)seed * 2654435761u + 1;
    int bad = 0;
    for (int round = 0; round < 8; round++) {
        for (int i = 0; i < N; i++) {
            sz[i] = (size_t)(rng_next(&rng) % 3000) + 1;
            p[i] = T_MALLOC(sz[i]);
            if (!p[i])
                return bad + 1;
            fill_pattern(p[i], sz[i], (uint64_t)i + seed);
        }
        for (int i = 0; i < N; i++) {
            if (find_pattern_mismatch(p[i], sz[i], (uint64_t)i + seed) != SIZE_MAX)
                bad++;
            T_FREE(p[i]);
        }
    }
    return bad;
}

/* A block that the host frees, possibly after dlclose(). */
__attribute__((visibility("default"))) void *plugin_alloc(size_t n, uint64_t seed) {
    void *p = T_MALLOC(n);
    if (p)
        fill_pattern(p, n, seed);
    return p;
}

/* Free a block the host allocated; returns 0 when its contents were intact. */
__attribute__((visibility("default"))) int plugin_check_free(void *p, size_t n, uint64_t seed) {
    int bad = find_pattern_mismatch(p, n, seed) != SIZE_MAX;
    T_FREE(p);
    return bad;
}

/* Does lgmalloc own this block? (only meaningful where lgmalloc is linked in) */
__attribute__((visibility("default"))) size_t plugin_usable_size(const void *p) {
    return lg_usable_size(p);
}
