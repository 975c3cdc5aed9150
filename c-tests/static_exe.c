/* A fully static executable (-static) linked with liblgmalloc.a built with the override:
 * lgmalloc's malloc replaces glibc's (whose malloc.o must stay out of the link), for the
 * program, for libc's internal calls and in threads.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <string.h>

#include "check.h"

static void *thread_main(void *arg) {
    uintptr_t me = (uintptr_t)arg;
    for (int i = 0; i < 2000; i++) {
        size_t n = (size_t)(i % 300) + 1;
        unsigned char *p = malloc(n);
        REQUIRE(p != NULL, "thread %lu: malloc(%zu) failed", (unsigned long)me, n);
        fill_pattern(p, n, (uint64_t)i);
        CHECK(find_pattern_mismatch(p, n, (uint64_t)i) == SIZE_MAX, "thread block corrupt");
        free(p);
    }
    return NULL;
}

int main(void) {
    struct lg_stats before, after;
    lg_stats(&before);
    enum { N = 300 };
    void *p[N];
    for (int i = 0; i < N; i++) {
        p[i] = (i & 1) ? calloc(1, (size_t)i + 1) : malloc((size_t)i + 1);
        REQUIRE(p[i] != NULL, "allocation of %d bytes failed", i + 1);
        CHECK(lg_usable_size(p[i]) >= (size_t)i + 1, "block %d: lg_usable_size %zu", i,
              lg_usable_size(p[i]));
    }
    lg_stats(&after);
    CHECK(after.alloc_count >= before.alloc_count + N, "alloc_count %llu -> %llu after %d allocations",
          (unsigned long long)before.alloc_count, (unsigned long long)after.alloc_count, N);
    for (int i = 0; i < N; i++) {
        p[i] = realloc(p[i], (size_t)i * 3 + 8);
        REQUIRE(p[i] != NULL, "realloc failed");
        free(p[i]);
    }
    char *s = strdup("static strdup");
    REQUIRE(s != NULL, "strdup failed");
    CHECK(lg_usable_size(s) >= 15, "strdup block not from lgmalloc (usable %zu)", lg_usable_size(s));
    free(s);
    void *pm = NULL;
    CHECK(posix_memalign(&pm, 256, 1000) == 0 && ((uintptr_t)pm & 255) == 0, "posix_memalign %p", pm);
    free(pm);
    pthread_t t[4];
    for (uintptr_t i = 0; i < 4; i++)
        REQUIRE(pthread_create(&t[i], NULL, thread_main, (void *)i) == 0, "pthread_create failed");
    for (int i = 0; i < 4; i++)
        pthread_join(t[i], NULL);
    errno = 0;
    void *huge = malloc((size_t)PTRDIFF_MAX + 1);
    CHECK(huge == NULL && errno == ENOMEM, "malloc(PTRDIFF_MAX + 1) = %p, errno %d", huge, errno);
    return check_summary("static_exe");
}
