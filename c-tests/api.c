/* C API conformance of lgmalloc (POSIX/glibc semantics), through the lg_* functions.
 *
 * Built twice by c-tests/CMakeLists.txt: against liblgmalloc.so (lgmalloc::lgmalloc)
 * and against liblgmalloc.a (lgmalloc::lgmalloc_static).
 *
 * Checked: the version string; 16-byte alignment and usable size >= request for every
 * size 1..4096 and for large sizes, with no two live blocks overlapping; lg_aligned_alloc
 * and lg_posix_memalign for every power of two up to 1 MiB; EINVAL for bad alignments
 * (posix_memalign returns it and leaves errno alone); NULL + ENOMEM for calloc overflow,
 * for sizes above PTRDIFF_MAX and for sizes no machine has; realloc growing and shrinking
 * keeps the contents, and a failed realloc leaves the old block valid; calloc zeroes
 * memory that was dirtied and freed before; free and free_sized keep errno; malloc(0)
 * gives distinct freeable pointers; lg_stats counters move with allocations and frees;
 * lg_trim returns and the allocator keeps working after it.
 *
 * lg_realloc(p, 0) returns a minimal block, never NULL (README, "Differences from
 * glibc"): the result is checked to be aligned, at most one smallest class (16 bytes)
 * and at least one byte usable, writable and freeable.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "check.h"

#ifndef EXPECTED_VERSION
#error "EXPECTED_VERSION must be defined by the build"
#endif

#define MIN_ALIGN 16u
#define KiB ((size_t)1024)
#define MiB (KiB * 1024)
#define OVER_PTRDIFF ((size_t)PTRDIFF_MAX + 1)

static int aligned_to(const void *p, size_t a) { return ((uintptr_t)p & (a - 1)) == 0; }

/* Touch a large block sparsely: one byte per page plus the last byte, then read back. */
static void touch_sparse(void *p, size_t n, unsigned char v) {
    unsigned char *b = p;
    for (size_t i = 0; i < n; i += 4096)
        b[i] = v;
    b[n - 1] = v;
}
static int check_sparse(const void *p, size_t n, unsigned char v) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i += 4096)
        if (b[i] != v)
            return 0;
    return b[n - 1] == v;
}

static void test_version(void) {
    const char *v = lg_version();
    CHECK(v != NULL && strcmp(v, EXPECTED_VERSION) == 0, "lg_version() = \"%s\", expected \"%s\"",
          v ? v : "(null)", EXPECTED_VERSION);
}

/* Every size 1..4096 live at once: alignment, usable size, and no overlap (each block
 * is filled over its whole usable size and verified after all are written). */
static void test_small_sizes(void) {
    enum { N = 4096 };
    static unsigned char *blocks[N + 1];
    static size_t usable[N + 1];
    for (size_t size = 1; size <= N; size++) {
        unsigned char *p = lg_malloc(size);
        REQUIRE(p != NULL, "lg_malloc(%zu) returned NULL", size);
        CHECK(aligned_to(p, MIN_ALIGN), "lg_malloc(%zu) = %p is not 16-byte aligned", size,
              (void *)p);
        usable[size] = lg_usable_size(p);
        CHECK(usable[size] >= size, "lg_usable_size(lg_malloc(%zu)) = %zu", size, usable[size]);
        fill_pattern(p, usable[size], size);
        blocks[size] = p;
    }
    for (size_t size = 1; size <= N; size++) {
        size_t bad = find_pattern_mismatch(blocks[size], usable[size], size);
        CHECK(bad == SIZE_MAX, "block of size %zu (usable %zu) overwritten at offset %zu", size,
              usable[size], bad);
    }
    /* Free in an interleaved order (odd sizes first) to mix the free lists. */
    for (size_t size = 1; size <= N; size += 2)
        lg_free(blocks[size]);
    for (size_t size = 2; size <= N; size += 2)
        lg_free(blocks[size]);
}

static void test_large_sizes(void) {
    for (unsigned shift = 12; shift <= 26; shift++) {
        size_t base = (size_t)1 << shift;
        size_t sizes[4] = {base - 1, base, base + 1, base + base / 2};
        void *ps[4];
        for (int i = 0; i < 4; i++) {
            ps[i] = lg_malloc(sizes[i]);
            REQUIRE(ps[i] != NULL, "lg_malloc(%zu) returned NULL", sizes[i]);
            CHECK(aligned_to(ps[i], MIN_ALIGN), "lg_malloc(%zu) = %p misaligned", sizes[i], ps[i]);
            CHECK(lg_usable_size(ps[i]) >= sizes[i], "lg_usable_size(lg_malloc(%zu)) = %zu",
                  sizes[i], lg_usable_size(ps[i]));
            touch_sparse(ps[i], sizes[i], (unsigned char)(shift * 4 + i));
        }
        for (int i = 0; i < 4; i++) {
            CHECK(check_sparse(ps[i], sizes[i], (unsigned char)(shift * 4 + i)),
                  "large block of %zu bytes overwritten", sizes[i]);
            lg_free(ps[i]);
        }
    }
}

static void test_aligned_alloc(void) {
    for (size_t align = 1; align <= MiB; align <<= 1) {
        size_t sizes[6] = {1, align / 2 + 1, align, align + 1, 3 * align, 100};
        void *ps[6];
        for (int i = 0; i < 6; i++) {
            size_t size = sizes[i];
            ps[i] = lg_aligned_alloc(align, size);
            REQUIRE(ps[i] != NULL, "lg_aligned_alloc(%zu, %zu) returned NULL", align, size);
            size_t want = align < MIN_ALIGN ? MIN_ALIGN : align;
            CHECK(aligned_to(ps[i], want), "lg_aligned_alloc(%zu, %zu) = %p not %zu-aligned",
                  align, size, ps[i], want);
            CHECK(lg_usable_size(ps[i]) >= size, "lg_usable_size(lg_aligned_alloc(%zu, %zu)) = %zu",
                  align, size, lg_usable_size(ps[i]));
            touch_sparse(ps[i], size, (unsigned char)(i + 1));
        }
        for (int i = 0; i < 6; i++) {
            CHECK(check_sparse(ps[i], sizes[i], (unsigned char)(i + 1)),
                  "lg_aligned_alloc(%zu, %zu) block overwritten", align, sizes[i]);
            lg_free(ps[i]);
        }
    }
    /* Many live blocks of one alignment (a single lucky block proves little). */
    void *many[64];
    for (int i = 0; i < 64; i++) {
        many[i] = lg_aligned_alloc(256, 48);
        REQUIRE(many[i] != NULL, "lg_aligned_alloc(256, 48) #%d returned NULL", i);
        CHECK(aligned_to(many[i], 256), "lg_aligned_alloc(256, 48) #%d = %p", i, many[i]);
        memset(many[i], i, 48);
    }
    for (int i = 0; i < 64; i++) {
        CHECK(((unsigned char *)many[i])[47] == (unsigned char)i, "aligned block #%d overwritten", i);
        lg_free(many[i]);
    }
}

static void test_posix_memalign(void) {
    for (size_t align = sizeof(void *); align <= MiB; align <<= 1) {
        size_t sizes[4] = {1, align, align + 1, 1000};
        for (int i = 0; i < 4; i++) {
            void *p = NULL;
            errno = EDOM;
            int rc = lg_posix_memalign(&p, align, sizes[i]);
            REQUIRE(rc == 0 && p != NULL, "lg_posix_memalign(%zu, %zu) = %d, %p", align, sizes[i],
                    rc, p);
            CHECK(errno == EDOM, "lg_posix_memalign success changed errno to %d", errno);
            size_t want = align < MIN_ALIGN ? MIN_ALIGN : align;
            CHECK(aligned_to(p, want), "lg_posix_memalign(%zu, %zu) = %p not %zu-aligned", align,
                  sizes[i], p, want);
            CHECK(lg_usable_size(p) >= sizes[i], "usable %zu < %zu", lg_usable_size(p), sizes[i]);
            touch_sparse(p, sizes[i], 0x77);
            lg_free(p);
        }
    }
}

static void test_bad_alignment(void) {
    /* aligned_alloc: EINVAL when the alignment is not a power of two. */
    size_t bad_aligned[] = {0, 3, 24, 48, 100, MiB + 16, SIZE_MAX};
    for (size_t i = 0; i < sizeof bad_aligned / sizeof *bad_aligned; i++) {
        errno = 0;
        void *p = lg_aligned_alloc(bad_aligned[i], 64);
        int e = errno;
        CHECK(p == NULL && e == EINVAL, "lg_aligned_alloc(%zu, 64) = %p, errno %d (want NULL, EINVAL)",
              bad_aligned[i], p, e);
        if (p)
            lg_free(p);
    }
    /* posix_memalign: returns EINVAL unless the alignment is a power of two multiple of
     * sizeof(void *); errno untouched; *out unmodified or NULL. */
    size_t bad_posix[] = {0, 1, 2, 4, 3, 12, 24, 40, 4096 + 8, SIZE_MAX};
    for (size_t i = 0; i < sizeof bad_posix / sizeof *bad_posix; i++) {
        void *sentinel = (void *)&bad_posix[i];
        void *p = sentinel;
        errno = EDOM;
        int rc = lg_posix_memalign(&p, bad_posix[i], 64);
        int e = errno;
        CHECK(rc == EINVAL, "lg_posix_memalign(%zu, 64) returned %d, want EINVAL (%d)", bad_posix[i],
              rc, EINVAL);
        CHECK(e == EDOM, "lg_posix_memalign(%zu, 64) set errno to %d", bad_posix[i], e);
        CHECK(p == sentinel || p == NULL, "lg_posix_memalign(%zu, 64) failed but wrote %p",
              bad_posix[i], p);
        if (rc == 0 && p != sentinel && p != NULL)
            lg_free(p);
    }
}

static void expect_enomem(void *p, const char *what, size_t a, size_t b) {
    int e = errno;
    CHECK(p == NULL && e == ENOMEM, "%s(%zu, %zu) = %p, errno %d (want NULL, ENOMEM)", what, a, b, p, e);
    if (p)
        lg_free(p);
}

static void test_enomem(void) {
    /* Above PTRDIFF_MAX: must fail, whatever the machine has. */
    size_t too_big[] = {OVER_PTRDIFF, SIZE_MAX, SIZE_MAX - 15, SIZE_MAX - 4096, OVER_PTRDIFF + 4096};
    for (size_t i = 0; i < sizeof too_big / sizeof *too_big; i++) {
        errno = 0;
        expect_enomem(lg_malloc(too_big[i]), "lg_malloc", too_big[i], 0);
        errno = 0;
        expect_enomem(lg_calloc(1, too_big[i]), "lg_calloc", 1, too_big[i]);
        errno = 0;
        expect_enomem(lg_aligned_alloc(64, too_big[i]), "lg_aligned_alloc", 64, too_big[i]);
        errno = 0;
        expect_enomem(lg_aligned_alloc(MiB, too_big[i]), "lg_aligned_alloc", MiB, too_big[i]);
        void *p = (void *)&too_big[i];
        errno = EDOM;
        int rc = lg_posix_memalign(&p, 64, too_big[i]);
        CHECK(rc == ENOMEM, "lg_posix_memalign(64, %zu) returned %d, want ENOMEM", too_big[i], rc);
        CHECK(errno == EDOM, "lg_posix_memalign(64, %zu) changed errno to %d", too_big[i], errno);
    }
    /* Below PTRDIFF_MAX but larger than any x86-64 address space (2^62 bytes). */
    errno = 0;
    expect_enomem(lg_malloc((size_t)1 << 62), "lg_malloc", (size_t)1 << 62, 0);
    errno = 0;
    expect_enomem(lg_calloc((size_t)1 << 31, (size_t)1 << 31), "lg_calloc", (size_t)1 << 31,
                  (size_t)1 << 31);
    /* calloc overflow of count * size. */
    size_t ovf[][2] = {{SIZE_MAX / 2 + 1, 2}, {(size_t)1 << 32, (size_t)1 << 32},
                       {SIZE_MAX, SIZE_MAX}, {3, SIZE_MAX / 3 + 1}, {2, OVER_PTRDIFF / 2}};
    for (size_t i = 0; i < sizeof ovf / sizeof *ovf; i++) {
        errno = 0;
        expect_enomem(lg_calloc(ovf[i][0], ovf[i][1]), "lg_calloc", ovf[i][0], ovf[i][1]);
    }
    /* A failed realloc leaves the old block valid and unchanged. */
    unsigned char *p = lg_malloc(200);
    REQUIRE(p != NULL, "lg_malloc(200) returned NULL");
    fill_pattern(p, 200, 42);
    size_t bad_re[] = {OVER_PTRDIFF, SIZE_MAX, (size_t)1 << 62};
    for (size_t i = 0; i < 3; i++) {
        errno = 0;
        void *q = lg_realloc(p, bad_re[i]);
        int e = errno;
        CHECK(q == NULL && e == ENOMEM, "lg_realloc(p, %zu) = %p, errno %d", bad_re[i], q, e);
        if (q != NULL) {
            p = q; /* should not happen; keep the block consistent */
            continue;
        }
        CHECK(find_pattern_mismatch(p, 200, 42) == SIZE_MAX, "failed lg_realloc(p, %zu) changed p",
              bad_re[i]);
        CHECK(lg_usable_size(p) >= 200, "failed lg_realloc shrank p to %zu", lg_usable_size(p));
    }
    lg_free(p);
    /* The allocator still works after all the failures. */
    void *ok = lg_malloc(1000);
    CHECK(ok != NULL, "lg_malloc(1000) after failures returned NULL");
    lg_free(ok);
}

static void test_realloc(void) {
    /* realloc(NULL, n) is malloc(n). */
    unsigned char *p = lg_realloc(NULL, 24);
    REQUIRE(p != NULL, "lg_realloc(NULL, 24) returned NULL");
    CHECK(aligned_to(p, MIN_ALIGN), "lg_realloc(NULL, 24) = %p misaligned", (void *)p);
    size_t size = 24;
    fill_pattern(p, size, 7);
    /* Grow 24 B -> 12 MiB through every class region, then shrink back. */
    size_t sizes[128];
    int n = 0;
    for (size_t s = 24; s <= 12 * MiB && n < 128; s = s * 3 / 2 + 5)
        sizes[n++] = s;
    for (int i = 1; i < n; i++) {
        unsigned char *q = lg_realloc(p, sizes[i]);
        REQUIRE(q != NULL, "lg_realloc(p, %zu) returned NULL", sizes[i]);
        size_t bad = find_pattern_mismatch(q, size, 7);
        CHECK(bad == SIZE_MAX, "grow %zu -> %zu lost contents at offset %zu", size, sizes[i], bad);
        CHECK(aligned_to(q, MIN_ALIGN), "lg_realloc(p, %zu) = %p misaligned", sizes[i], (void *)q);
        CHECK(lg_usable_size(q) >= sizes[i], "lg_realloc(p, %zu): usable %zu", sizes[i],
              lg_usable_size(q));
        p = q;
        size = sizes[i];
        fill_pattern(p, size, 7);
    }
    for (int i = n - 2; i >= 0; i--) {
        unsigned char *q = lg_realloc(p, sizes[i]);
        REQUIRE(q != NULL, "lg_realloc(p, %zu) returned NULL", sizes[i]);
        size_t bad = find_pattern_mismatch(q, sizes[i], 7);
        CHECK(bad == SIZE_MAX, "shrink %zu -> %zu lost contents at offset %zu", size, sizes[i], bad);
        CHECK(lg_usable_size(q) >= sizes[i], "lg_realloc(p, %zu): usable %zu", sizes[i],
              lg_usable_size(q));
        p = q;
        size = sizes[i];
    }
    /* realloc to exactly the usable size keeps everything. */
    size_t u = lg_usable_size(p);
    fill_pattern(p, u, 8);
    unsigned char *q = lg_realloc(p, u);
    REQUIRE(q != NULL, "lg_realloc(p, usable %zu) returned NULL", u);
    CHECK(find_pattern_mismatch(q, u, 8) == SIZE_MAX, "lg_realloc to the usable size lost contents");
    p = q;
    /* realloc(p, 0): p is given up and a minimal block comes back (never NULL). */
    unsigned char *z = lg_realloc(p, 0);
    REQUIRE(z != NULL, "lg_realloc(p, 0) returned NULL: the README promises a minimal block");
    CHECK(aligned_to(z, MIN_ALIGN), "lg_realloc(p, 0) = %p misaligned", (void *)z);
    size_t zu = lg_usable_size(z);
    CHECK(zu >= 1 && zu <= MIN_ALIGN, "lg_realloc(p, 0): usable size %zu is not minimal", zu);
    fill_pattern(z, zu, 77);
    CHECK(find_pattern_mismatch(z, zu, 77) == SIZE_MAX, "lg_realloc(p, 0): block not writable");
    /* ... and it is an ordinary block: it grows with realloc and frees. */
    unsigned char *zz = lg_realloc(z, 300);
    REQUIRE(zz != NULL, "lg_realloc(minimal block, 300) returned NULL");
    CHECK(find_pattern_mismatch(zz, zu, 77) == SIZE_MAX, "growing the minimal block lost contents");
    lg_free(zz);
    /* An over-aligned block can be reallocated; contents survive. */
    unsigned char *a = lg_aligned_alloc(4096, 100);
    REQUIRE(a != NULL, "lg_aligned_alloc(4096, 100) returned NULL");
    fill_pattern(a, 100, 9);
    unsigned char *b = lg_realloc(a, 100000);
    REQUIRE(b != NULL, "lg_realloc(aligned, 100000) returned NULL");
    CHECK(find_pattern_mismatch(b, 100, 9) == SIZE_MAX, "realloc of an aligned block lost contents");
    lg_free(b);
}

/* calloc must hand out zeroes even where freed blocks were dirtied before. */
static void test_calloc_zeroes(void) {
    size_t sizes[] = {1,    8,    16,    24,    32,     48,      64,      100,     128,
                      256,  512,  1000,  1024,  2048,   4000,    4096,    8192,    16384,
                      65536, 100000, 262144, 1 << 20, 4 << 20};
    enum { MAXK = 65 };
    for (size_t si = 0; si < sizeof sizes / sizeof *sizes; si++) {
        size_t size = sizes[si];
        size_t k = (8 * MiB) / size;
        if (k > MAXK)
            k = MAXK;
        if (k < 2)
            k = 2;
        void *ps[MAXK];
        for (int round = 0; round < 3; round++) {
            for (size_t i = 0; i < k; i++) {
                ps[i] = lg_malloc(size);
                REQUIRE(ps[i] != NULL, "lg_malloc(%zu) returned NULL", size);
                memset(ps[i], 0xA5, lg_usable_size(ps[i]));
            }
            for (size_t i = k; i-- > 0;)
                lg_free(ps[i]);
            for (size_t i = 0; i < k; i++) {
                /* Alternate the two shapes of the same request. */
                unsigned char *c = (i & 1) ? lg_calloc(size, 1) : lg_calloc(1, size);
                REQUIRE(c != NULL, "lg_calloc(%zu) returned NULL", size);
                size_t nonzero = SIZE_MAX;
                for (size_t j = 0; j < size; j++)
                    if (c[j] != 0) {
                        nonzero = j;
                        break;
                    }
                CHECK(nonzero == SIZE_MAX, "lg_calloc(%zu) round %d block %zu: byte %zu is 0x%02x",
                      size, round, i, nonzero, nonzero == SIZE_MAX ? 0 : c[nonzero]);
                memset(c, 0x5A, size); /* dirty again for the next round */
                ps[i] = c;
            }
            for (size_t i = 0; i < k; i++)
                lg_free(ps[i]);
        }
    }
    /* Element-count form with a small element. */
    uint32_t *v = lg_calloc(1000, sizeof(uint32_t));
    REQUIRE(v != NULL, "lg_calloc(1000, 4) returned NULL");
    for (int i = 0; i < 1000; i++)
        CHECK(v[i] == 0, "lg_calloc(1000, 4)[%d] = %u", i, v[i]);
    lg_free(v);
}

static void test_free_keeps_errno(void) {
    size_t sizes[] = {1, 32, 1000, 20000, 300000, 16 * MiB};
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) {
        void *p = lg_malloc(sizes[i]);
        REQUIRE(p != NULL, "lg_malloc(%zu) returned NULL", sizes[i]);
        errno = EDOM;
        lg_free(p);
        CHECK(errno == EDOM, "lg_free(%zu-byte block) changed errno to %d", sizes[i], errno);
        p = lg_malloc(sizes[i]);
        REQUIRE(p != NULL, "lg_malloc(%zu) returned NULL", sizes[i]);
        errno = ERANGE;
        lg_free_sized(p, sizes[i]);
        CHECK(errno == ERANGE, "lg_free_sized(p, %zu) changed errno to %d", sizes[i], errno);
    }
    void *a = lg_aligned_alloc(MiB, 10);
    REQUIRE(a != NULL, "lg_aligned_alloc(1 MiB, 10) returned NULL");
    errno = EILSEQ;
    lg_free(a);
    CHECK(errno == EILSEQ, "lg_free(aligned block) changed errno to %d", errno);
    errno = EDOM;
    lg_free(NULL);
    CHECK(errno == EDOM, "lg_free(NULL) changed errno to %d", errno);
    lg_free_sized(NULL, 0);
    CHECK(errno == EDOM, "lg_free_sized(NULL, 0) changed errno to %d", errno);
}

static void test_free_sized(void) {
    void *ps[300];
    for (int i = 0; i < 300; i++) {
        size_t size = (size_t)i * 97 + 1;
        ps[i] = lg_malloc(size);
        REQUIRE(ps[i] != NULL, "lg_malloc(%zu) returned NULL", size);
        fill_pattern(ps[i], size, (uint64_t)i);
    }
    for (int i = 0; i < 300; i++) {
        size_t size = (size_t)i * 97 + 1;
        CHECK(find_pattern_mismatch(ps[i], size, (uint64_t)i) == SIZE_MAX, "block %d overwritten", i);
        lg_free_sized(ps[i], size);
    }
}

static void test_zero_size(void) {
    enum { N = 64 };
    void *ps[N];
    for (int i = 0; i < N; i++) {
        ps[i] = lg_malloc(0);
        REQUIRE(ps[i] != NULL, "lg_malloc(0) #%d returned NULL", i);
        CHECK(aligned_to(ps[i], MIN_ALIGN), "lg_malloc(0) = %p misaligned", ps[i]);
        for (int j = 0; j < i; j++)
            CHECK(ps[i] != ps[j], "lg_malloc(0) returned %p twice (#%d and #%d)", ps[i], j, i);
    }
    for (int i = 0; i < N; i++)
        lg_free(ps[i]);
    /* Zero-size variants: whatever they return must be freeable. */
    void *c1 = lg_calloc(0, 8), *c2 = lg_calloc(8, 0), *a = lg_aligned_alloc(64, 0);
    lg_free(c1);
    lg_free(c2);
    lg_free(a);
    void *pm = NULL;
    int rc = lg_posix_memalign(&pm, 64, 0);
    CHECK(rc == 0, "lg_posix_memalign(64, 0) returned %d", rc);
    if (rc == 0)
        lg_free(pm);
    CHECK(lg_usable_size(NULL) == 0, "lg_usable_size(NULL) = %zu", lg_usable_size(NULL));
}

static uint64_t class_live_blocks(const struct lg_stats *s) {
    uint64_t n = 0;
    uint32_t count = s->class_count < LG_MAX_CLASSES ? s->class_count : LG_MAX_CLASSES;
    for (uint32_t i = 0; i < count; i++)
        n += s->classes[i].live_blocks;
    return n;
}

static void check_stats_sane(const struct lg_stats *s, const char *when) {
    CHECK(s->bytes_reserved >= s->bytes_committed, "%s: reserved %llu < committed %llu", when,
          (unsigned long long)s->bytes_reserved, (unsigned long long)s->bytes_committed);
    CHECK(s->peak_bytes_committed >= s->bytes_committed, "%s: peak %llu < committed %llu", when,
          (unsigned long long)s->peak_bytes_committed, (unsigned long long)s->bytes_committed);
    CHECK(s->bytes_committed >= s->bytes_allocated, "%s: committed %llu < allocated %llu", when,
          (unsigned long long)s->bytes_committed, (unsigned long long)s->bytes_allocated);
    CHECK(s->class_count >= 1 && s->class_count <= LG_MAX_CLASSES, "%s: class_count %u", when,
          s->class_count);
    uint32_t count = s->class_count < LG_MAX_CLASSES ? s->class_count : LG_MAX_CLASSES;
    for (uint32_t i = 0; i < count; i++)
        CHECK(s->classes[i].block_size > 0, "%s: class %u has block_size 0", when, i);
}

static void test_stats(void) {
    enum { N = 1000 };
    const size_t big = 8 * MiB;
    static void *ps[N];
    struct lg_stats a, b, c;
    memset(&a, 0xff, sizeof a);
    lg_stats(&a);
    check_stats_sane(&a, "before");
    for (int i = 0; i < N; i++) {
        ps[i] = lg_malloc(64);
        REQUIRE(ps[i] != NULL, "lg_malloc(64) returned NULL");
        memset(ps[i], i, 64);
    }
    void *large = lg_malloc(big);
    REQUIRE(large != NULL, "lg_malloc(8 MiB) returned NULL");
    touch_sparse(large, big, 1);
    lg_stats(&b);
    check_stats_sane(&b, "after allocating");
    CHECK(b.alloc_count >= a.alloc_count + N + 1, "alloc_count %llu -> %llu after %d allocations",
          (unsigned long long)a.alloc_count, (unsigned long long)b.alloc_count, N + 1);
    CHECK(b.bytes_allocated >= a.bytes_allocated + big + 64 * N,
          "bytes_allocated %llu -> %llu after allocating %zu bytes",
          (unsigned long long)a.bytes_allocated, (unsigned long long)b.bytes_allocated, big + 64 * N);
    CHECK(b.large_live >= a.large_live + 1, "large_live %llu -> %llu with an 8 MiB block live",
          (unsigned long long)a.large_live, (unsigned long long)b.large_live);
    CHECK(b.live_heaps >= 1, "live_heaps = %llu", (unsigned long long)b.live_heaps);
    CHECK(class_live_blocks(&b) >= class_live_blocks(&a) + N,
          "live blocks over all classes %llu -> %llu with %d more 64-byte blocks",
          (unsigned long long)class_live_blocks(&a), (unsigned long long)class_live_blocks(&b), N);
    for (int i = 0; i < N; i++)
        lg_free(ps[i]);
    lg_free(large);
    lg_stats(&c);
    check_stats_sane(&c, "after freeing");
    CHECK(c.free_count >= b.free_count + N + 1, "free_count %llu -> %llu after %d frees",
          (unsigned long long)b.free_count, (unsigned long long)c.free_count, N + 1);
    CHECK(c.alloc_count >= b.alloc_count, "alloc_count went back: %llu -> %llu",
          (unsigned long long)b.alloc_count, (unsigned long long)c.alloc_count);
    CHECK(c.bytes_allocated + big + 64 * N <= b.bytes_allocated,
          "bytes_allocated %llu -> %llu after freeing %zu bytes", (unsigned long long)b.bytes_allocated,
          (unsigned long long)c.bytes_allocated, big + 64 * N);
    CHECK(c.large_live + 1 <= b.large_live, "large_live %llu -> %llu after freeing the large block",
          (unsigned long long)b.large_live, (unsigned long long)c.large_live);
    CHECK(c.peak_bytes_committed >= b.peak_bytes_committed, "peak went down: %llu -> %llu",
          (unsigned long long)b.peak_bytes_committed, (unsigned long long)c.peak_bytes_committed);
    CHECK(class_live_blocks(&c) + N <= class_live_blocks(&b),
          "live blocks over all classes %llu -> %llu after %d frees",
          (unsigned long long)class_live_blocks(&b), (unsigned long long)class_live_blocks(&c), N);
}

static void test_trim(void) {
    enum { BIG = 256, SMALL = 20000 };
    static void *bigs[BIG], *smalls[SMALL];
    for (int i = 0; i < BIG; i++) {
        bigs[i] = lg_malloc(256 * KiB);
        REQUIRE(bigs[i] != NULL, "lg_malloc(256 KiB) returned NULL");
        touch_sparse(bigs[i], 256 * KiB, 3);
    }
    for (int i = 0; i < SMALL; i++) {
        smalls[i] = lg_malloc(100);
        REQUIRE(smalls[i] != NULL, "lg_malloc(100) returned NULL");
        memset(smalls[i], 4, 100);
    }
    for (int i = 0; i < BIG; i++)
        lg_free(bigs[i]);
    for (int i = 0; i < SMALL; i++)
        lg_free(smalls[i]);
    struct lg_stats before, after;
    lg_stats(&before);
    size_t released = lg_trim();
    lg_stats(&after);
    printf("lg_trim() released %zu bytes; committed %llu -> %llu\n", released,
           (unsigned long long)before.bytes_committed, (unsigned long long)after.bytes_committed);
    CHECK(after.bytes_committed <= before.bytes_committed, "lg_trim raised committed: %llu -> %llu",
          (unsigned long long)before.bytes_committed, (unsigned long long)after.bytes_committed);
    CHECK(released <= before.bytes_reserved, "lg_trim released %zu bytes of %llu reserved", released,
          (unsigned long long)before.bytes_reserved);
    /* Everything keeps working after a trim. */
    for (int i = 0; i < SMALL; i++) {
        size_t size = (size_t)(i % 700) + 1;
        smalls[i] = lg_malloc(size);
        REQUIRE(smalls[i] != NULL, "lg_malloc(%zu) after lg_trim returned NULL", size);
        fill_pattern(smalls[i], size, (uint64_t)i);
    }
    for (int i = 0; i < SMALL; i++) {
        size_t size = (size_t)(i % 700) + 1;
        CHECK(find_pattern_mismatch(smalls[i], size, (uint64_t)i) == SIZE_MAX,
              "block %d overwritten after lg_trim", i);
        lg_free(smalls[i]);
    }
    (void)lg_trim();
}

int main(void) {
    test_version();
    test_small_sizes();
    test_large_sizes();
    test_aligned_alloc();
    test_posix_memalign();
    test_bad_alignment();
    test_enomem();
    test_realloc();
    test_calloc_zeroes();
    test_free_keeps_errno();
    test_free_sized();
    test_zero_size();
    test_stats();
    test_trim();
    return check_summary("api");
}
