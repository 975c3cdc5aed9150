/* dlopen/dlclose of a small shared library (dlplugin.c) that allocates and frees, over
 * and over, from the main thread and from short-lived threads; blocks cross the library
 * boundary in both directions and some are freed after the library is unloaded.
 * argv[1] is the path of the plugin.
 *
 * LATE_LOAD: the host is not linked with lgmalloc at all: liblgmalloc.so arrives as a
 * dependency of the plugin at dlopen() time (like a Python extension built on it), may
 * leave with it at dlclose(), and threads are created and exit after the plugin has been
 * closed again. Blocks are freed while the plugin is loaded.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <string.h>

#include "check.h"

typedef int (*churn_fn)(unsigned);
typedef void *(*alloc_fn)(size_t, uint64_t);
typedef int (*check_free_fn)(void *, size_t, uint64_t);
typedef size_t (*usable_fn)(const void *);

static churn_fn churn;

static void *thread_churn(void *arg) {
    return (void *)(intptr_t)churn((unsigned)(uintptr_t)arg);
}

static void *thread_plain(void *arg) {
    (void)arg;
    return NULL;
}

int main(int argc, char **argv) {
    REQUIRE(argc >= 2, "usage: dlopen PLUGIN");
    enum { ROUNDS = 40, KEEP = 4 };
    struct { void *p; size_t n; uint64_t seed; } kept[ROUNDS * KEEP];
    int nkept = 0;
    for (int round = 0; round < ROUNDS; round++) {
        void *h = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
        REQUIRE(h != NULL, "round %d: dlopen(%s): %s", round, argv[1], dlerror());
        churn = (churn_fn)dlsym(h, "plugin_churn");
        alloc_fn palloc = (alloc_fn)dlsym(h, "plugin_alloc");
        check_free_fn pcheck_free = (check_free_fn)dlsym(h, "plugin_check_free");
        usable_fn pusable = (usable_fn)dlsym(h, "plugin_usable_size");
        REQUIRE(churn && palloc && pcheck_free && pusable, "round %d: plugin symbols missing", round);

        CHECK(churn((unsigned)round) == 0, "round %d: plugin_churn found corruption", round);
        pthread_t t[3];
        for (uintptr_t i = 0; i < 3; i++)
            REQUIRE(pthread_create(&t[i], NULL, thread_churn, (void *)(i + 10 * (uintptr_t)round)) == 0,
                    "pthread_create failed");
        for (int i = 0; i < 3; i++) {
            void *ret = (void *)1;
            pthread_join(t[i], &ret);
            CHECK(ret == NULL, "round %d: plugin_churn in thread %d found corruption", round, i);
        }
        for (int k = 0; k < KEEP; k++) {
            size_t n = 16 + (size_t)(round * 131 + k * 977) % 5000;
            uint64_t seed = (uint64_t)round * 100 + (uint64_t)k;
            void *p = palloc(n, seed);
            REQUIRE(p != NULL, "round %d: plugin_alloc(%zu) returned NULL", round, n);
            CHECK(pusable(p) >= n, "round %d: plugin block not from lgmalloc (usable %zu < %zu)", round,
                  pusable(p), n);
            kept[nkept].p = p;
            kept[nkept].n = n;
            kept[nkept].seed = seed;
            nkept++;
        }
#ifndef LATE_LOAD
        /* Host block, freed inside the plugin. */
        void *hp = T_MALLOC(1234);
        REQUIRE(hp != NULL, "host allocation failed");
        fill_pattern(hp, 1234, 77);
        CHECK(pcheck_free(hp, 1234, 77) == 0, "round %d: host block corrupt in plugin", round);
#else
        /* liblgmalloc.so may go away with the plugin: free its blocks while it is loaded. */
        while (nkept > 0) {
            nkept--;
            CHECK(pcheck_free(kept[nkept].p, kept[nkept].n, kept[nkept].seed) == 0,
                  "round %d: kept block corrupt", round);
        }
#endif
        CHECK(dlclose(h) == 0, "round %d: dlclose: %s", round, dlerror());
        /* Threads that start and end with the plugin unloaded. */
        pthread_t tp;
        REQUIRE(pthread_create(&tp, NULL, thread_plain, NULL) == 0, "pthread_create failed");
        pthread_join(tp, NULL);
    }
#ifndef LATE_LOAD
    /* Blocks from the (now unloaded) plugin, freed by the host. */
    for (int i = 0; i < nkept; i++) {
        CHECK(find_pattern_mismatch(kept[i].p, kept[i].n, kept[i].seed) == SIZE_MAX,
              "plugin block %d corrupt after dlclose", i);
        CHECK(lg_usable_size(kept[i].p) >= kept[i].n, "plugin block %d: usable %zu < %zu", i,
              lg_usable_size(kept[i].p), kept[i].n);
        T_FREE(kept[i].p);
    }
#endif
    return check_summary("dlopen");
}
