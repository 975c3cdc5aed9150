/* Small check helpers shared by the lgmalloc C tests.
 *
 * CHECK(cond, fmt, ...) prints the failed condition with file:line and a message and
 * counts the failure; the test keeps going so one run shows every broken case.
 * REQUIRE(...) does the same and exits at once (for states the rest cannot survive).
 * Every test ends with `return check_summary("name");` (exit 1 when anything failed).
 *
 * The allocation functions under test are chosen at compile time:
 *   default              the lgmalloc API (lg_malloc, lg_free, ...)
 *   -DUSE_LIBC_MALLOC=1  the C names (malloc, free, ...), served by lgmalloc through
 *                        the `override` feature; lg_usable_size() then proves the
 *                        block belongs to lgmalloc.
 */
#ifndef LGMALLOC_CHECK_H
#define LGMALLOC_CHECK_H

#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include <lgmalloc.h>

static atomic_int check_failures;

/* Only the first CHECK_REPORT_MAX failures are printed; all are counted. */
#define CHECK_REPORT_MAX 25

#define CHECK(cond, ...)                                                              \
    do {                                                                              \
        if (!(cond)) {                                                                \
            if (atomic_fetch_add(&check_failures, 1) < CHECK_REPORT_MAX) {            \
                fprintf(stderr, "%s:%d: FAIL: %s: ", __FILE__, __LINE__, #cond);      \
                fprintf(stderr, __VA_ARGS__);                                         \
                fputc('\n', stderr);                                                  \
                fflush(stderr);                                                       \
            }                                                                         \
        }                                                                             \
    } while (0)

#define REQUIRE(cond, ...)                                                            \
    do {                                                                              \
        if (!(cond)) {                                                                \
            fprintf(stderr, "%s:%d: FATAL: %s: ", __FILE__, __LINE__, #cond);         \
            fprintf(stderr, __VA_ARGS__);                                             \
            fputc('\n', stderr);                                                      \
            fflush(stderr);                                                           \
            exit(1);                                                                  \
        }                                                                             \
    } while (0)

static inline int check_summary(const char *name) {
    int n = atomic_load(&check_failures);
    if (n != 0) {
        fprintf(stderr, "%s: %d check(s) failed\n", name, n);
        return 1;
    }
    printf("%s: all checks passed\n", name);
    return 0;
}

#if defined(USE_LIBC_MALLOC) && USE_LIBC_MALLOC
#define T_MALLOC(n) malloc(n)
#define T_CALLOC(c, n) calloc(c, n)
#define T_REALLOC(p, n) realloc(p, n)
#define T_FREE(p) free(p)
#define T_API "libc names (override)"

/* Before anything else: the C names must reach lgmalloc, or every later check would
 * only report the same fact (or poke lg_usable_size at foreign blocks). */
__attribute__((constructor)) static void check_malloc_is_lgmalloc(void) {
    struct lg_stats *before = lg_malloc(2 * sizeof(struct lg_stats));
    if (before == NULL) {
        fprintf(stderr, "FATAL: lg_malloc failed\n");
        exit(1);
    }
    struct lg_stats *after = before + 1;
    lg_stats(before);
    void *volatile p = malloc(24);
    lg_stats(after);
    int ok = p != NULL && after->alloc_count > before->alloc_count;
    free(p);
    lg_free(before);
    if (!ok) {
        fprintf(stderr, "FATAL: malloc() is not served by lgmalloc (lg_stats alloc_count did not move):"
                        " is lgmalloc built with the override feature?\n");
        exit(1);
    }
}
#else
#define T_MALLOC(n) lg_malloc(n)
#define T_CALLOC(c, n) lg_calloc(c, n)
#define T_REALLOC(p, n) lg_realloc(p, n)
#define T_FREE(p) lg_free(p)
#define T_API "lg_* API"
#endif

/* Deterministic byte pattern for a block: depends on a seed and the offset. */
static inline unsigned char pattern_byte(uint64_t seed, size_t i) {
    uint64_t x = seed * 0x9E3779B97F4A7C15ull + (uint64_t)i * 0xBF58476D1CE4E5B9ull;
    return (unsigned char)(x >> 56);
}

static inline void fill_pattern(void *p, size_t n, uint64_t seed) {
    unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        b[i] = pattern_byte(seed, i);
}

/* Offset of the first byte that differs from the pattern, or SIZE_MAX. */
static inline size_t find_pattern_mismatch(const void *p, size_t n, uint64_t seed) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        if (b[i] != pattern_byte(seed, i))
            return i;
    return SIZE_MAX;
}

/* xorshift64*: cheap per-thread random numbers. */
static inline uint64_t rng_next(uint64_t *s) {
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1Dull;
}

#endif
