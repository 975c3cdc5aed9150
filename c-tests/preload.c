/* Run with LD_PRELOAD=<installed liblgmalloc.so> (override builds). This program is not
 * linked with lgmalloc: everything is looked up at run time.
 *   - lg_malloc is present in the process;
 *   - malloc, free, calloc, realloc, malloc_usable_size, posix_memalign, aligned_alloc,
 *     memalign resolve into liblgmalloc (dladdr);
 *   - blocks from the C functions, and from libc's own internal allocations (strdup,
 *     getline, asprintf, fopen), are lgmalloc blocks (lg_usable_size > 0) and
 *     malloc_usable_size agrees with lg_usable_size.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <malloc.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures;
#define CHECK(cond, ...)                                                                  \
    do {                                                                                  \
        if (!(cond)) {                                                                    \
            failures++;                                                                   \
            fprintf(stderr, "%s:%d: FAIL: %s: ", __FILE__, __LINE__, #cond);              \
            fprintf(stderr, __VA_ARGS__);                                                 \
            fputc('\n', stderr);                                                          \
        }                                                                                 \
    } while (0)

typedef size_t (*usable_fn)(const void *);
static usable_fn lg_usable;

static void check_owned(void *p, size_t n, const char *what) {
    CHECK(p != NULL, "%s returned NULL", what);
    if (!p)
        return;
    size_t u = lg_usable(p);
    CHECK(u >= n, "%s: lg_usable_size = %zu < %zu (not an lgmalloc block?)", what, u, n);
    CHECK(malloc_usable_size(p) == u, "%s: malloc_usable_size %zu != lg_usable_size %zu", what,
          malloc_usable_size(p), u);
}

int main(void) {
    const char *preload = getenv("LD_PRELOAD");
    printf("LD_PRELOAD=%s\n", preload ? preload : "(unset)");
    void *lgm = dlsym(RTLD_DEFAULT, "lg_malloc");
    lg_usable = (usable_fn)dlsym(RTLD_DEFAULT, "lg_usable_size");
    if (!lgm || !lg_usable) {
        fprintf(stderr, "FAIL: lg_malloc/lg_usable_size not found: liblgmalloc is not preloaded\n");
        return 1;
    }
    Dl_info lg_info;
    if (!dladdr(lgm, &lg_info) || !lg_info.dli_fname) {
        fprintf(stderr, "FAIL: dladdr(lg_malloc) failed\n");
        return 1;
    }
    printf("lg_malloc is in %s\n", lg_info.dli_fname);
    const char *names[] = {"malloc", "free", "calloc", "realloc", "malloc_usable_size",
                           "posix_memalign", "aligned_alloc", "memalign", "valloc"};
    int misrouted = 0;
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        void *s = dlsym(RTLD_DEFAULT, names[i]);
        Dl_info info;
        int ok = s && dladdr(s, &info) && info.dli_fname && info.dli_fbase == lg_info.dli_fbase;
        CHECK(ok, "%s resolves to %s, not to liblgmalloc", names[i],
              s && dladdr(s, &info) && info.dli_fname ? info.dli_fname : "(nothing)");
        misrouted += !ok;
    }
    if (misrouted)
        return 1; /* lg_usable_size on foreign blocks below would be meaningless */

    check_owned(malloc(100), 100, "malloc(100)");
    void *c = calloc(10, 10);
    check_owned(c, 100, "calloc(10, 10)");
    void *r = realloc(c, 10000);
    check_owned(r, 10000, "realloc(p, 10000)");
    free(r);
    void *pm = NULL;
    CHECK(posix_memalign(&pm, 4096, 100) == 0 && ((uintptr_t)pm & 4095) == 0, "posix_memalign");
    check_owned(pm, 100, "posix_memalign(4096, 100)");
    free(pm);
    void *aa = aligned_alloc(64, 640);
    CHECK(((uintptr_t)aa & 63) == 0, "aligned_alloc(64) = %p", aa);
    check_owned(aa, 640, "aligned_alloc(64, 640)");
    free(aa);
    void *ma = memalign(256, 10);
    check_owned(ma, 10, "memalign(256, 10)");
    free(ma);
    /* libc's internal allocations go to lgmalloc too. */
    char *s = strdup("a string copied by libc");
    check_owned(s, strlen("a string copied by libc") + 1, "strdup");
    free(s);
    char *fmt = NULL;
    CHECK(asprintf(&fmt, "%d-%s", 42, "formatted") > 0, "asprintf failed");
    check_owned(fmt, 12, "asprintf");
    free(fmt);
    FILE *f = fopen("/proc/self/status", "r");
    CHECK(f != NULL, "fopen(/proc/self/status): %s", strerror(errno));
    if (f) {
        char *line = NULL;
        size_t cap = 0;
        CHECK(getline(&line, &cap, f) > 0, "getline failed");
        check_owned(line, 1, "getline");
        free(line);
        fclose(f);
    }
    errno = 0;
    void *huge = malloc((size_t)PTRDIFF_MAX + 1);
    CHECK(huge == NULL && errno == ENOMEM, "malloc(PTRDIFF_MAX + 1) = %p, errno %d", huge, errno);
    if (failures) {
        fprintf(stderr, "preload: %d check(s) failed\n", failures);
        return 1;
    }
    printf("preload: all checks passed\n");
    return 0;
}
