/* pkg-config consumer: built by cmake/PkgConfigTest.cmake from
 * `pkg-config --cflags --libs lgmalloc` alone. argv[1] is the expected version. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <lgmalloc.h>

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s VERSION\n", argv[0]);
        return 2;
    }
    if (strcmp(lg_version(), argv[1]) != 0) {
        fprintf(stderr, "FAIL: lg_version() = \"%s\", expected \"%s\"\n", lg_version(), argv[1]);
        return 1;
    }
    char *p = lg_malloc(100);
    if (p == NULL || ((uintptr_t)p & 15) != 0 || lg_usable_size(p) < 100) {
        fprintf(stderr, "FAIL: lg_malloc(100) = %p, usable %zu\n", (void *)p,
                p ? lg_usable_size(p) : 0);
        return 1;
    }
    memset(p, 0x5a, 100);
    lg_free(p);
    Dl_info info;
    /* The dynamic symbol when there is one (shared build), else the linked-in code. */
    void *sym = dlsym(RTLD_DEFAULT, "lg_malloc");
    if (sym == NULL)
        sym = (void *)&lg_malloc;
    if (dladdr(sym, &info) == 0 || info.dli_fname == NULL) {
        fprintf(stderr, "FAIL: dladdr(lg_malloc) found nothing\n");
        return 1;
    }
    printf("lg_version: %s\nlg_malloc from: %s\n", lg_version(), info.dli_fname);
    return 0;
}
