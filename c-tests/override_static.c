/* Linked with lgmalloc::lgmalloc_static in an override build: the archive's malloc & co.
 * replace the C library's in this (dynamically linked) program, for its own calls and
 * for the C library's internal ones.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <string.h>

#include "check.h"

int main(void) {
    struct lg_stats before, after;
    lg_stats(&before);
    enum { N = 500 };
    void *p[N];
    for (int i = 0; i < N; i++) {
        p[i] = malloc((size_t)i + 1);
        REQUIRE(p[i] != NULL, "malloc(%d) returned NULL", i + 1);
        CHECK(lg_usable_size(p[i]) >= (size_t)i + 1, "malloc(%d): lg_usable_size %zu", i + 1,
              lg_usable_size(p[i]));
        memset(p[i], 0x11, (size_t)i + 1);
    }
    lg_stats(&after);
    CHECK(after.alloc_count >= before.alloc_count + N, "alloc_count %llu -> %llu after %d malloc calls",
          (unsigned long long)before.alloc_count, (unsigned long long)after.alloc_count, N);
    for (int i = 0; i < N; i++)
        free(p[i]);
    struct lg_stats freed;
    lg_stats(&freed);
    CHECK(freed.free_count >= after.free_count + N, "free_count %llu -> %llu after %d free calls",
          (unsigned long long)after.free_count, (unsigned long long)freed.free_count, N);

    /* The program's malloc is the archive's, also for libc.so's internal calls. */
    void *m = dlsym(RTLD_DEFAULT, "malloc");
    Dl_info info;
    CHECK(m != NULL && dladdr(m, &info) && info.dli_fname && strstr(info.dli_fname, "libc.so") == NULL,
          "malloc resolves to %s", m && dladdr(m, &info) && info.dli_fname ? info.dli_fname : "(nothing)");
    char *s = strdup("copied by libc.so");
    REQUIRE(s != NULL, "strdup failed");
    CHECK(lg_usable_size(s) >= 18, "strdup result is not an lgmalloc block (usable %zu)", lg_usable_size(s));
    free(s);
    void *c = calloc(100, 100), *a = aligned_alloc(4096, 4096);
    CHECK(c && lg_usable_size(c) >= 10000, "calloc block not from lgmalloc");
    CHECK(a && ((uintptr_t)a & 4095) == 0 && lg_usable_size(a) >= 4096, "aligned_alloc block %p", a);
    free(c);
    free(a);
    errno = 0;
    void *huge = malloc(SIZE_MAX);
    CHECK(huge == NULL && errno == ENOMEM, "malloc(SIZE_MAX) = %p, errno %d", huge, errno);
    return check_summary("override_static");
}
