/* Shared helpers for the workloads: arguments, clock, random numbers, RSS, output.
 *
 * Every workload takes `key=value` arguments (plus `--quick` for the small size) and
 * prints exactly one line
 *     RESULT workload=<name> api=<lg|mi|malloc> key=value key=value ...
 * on stdout when it finishes. The runner (bench/run.py) parses that line.
 * Nothing here allocates through malloc (RSS is read with open/read into a stack
 * buffer) so the helpers do not disturb what is measured.
 */
#ifndef BENCH_H
#define BENCH_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "alloc_api.h"

#define CACHE_LINE 64

/* ---- arguments ------------------------------------------------------------------- */

static int g_quick;
static int g_argc;
static char **g_argv;

static void args_init(int argc, char **argv) {
    g_argc = argc;
    g_argv = argv;
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "--quick") == 0) g_quick = 1;
}

/* The value given as `key=value`, or NULL. */
static const char *arg_raw(const char *key) {
    size_t n = strlen(key);
    for (int i = 1; i < g_argc; i++)
        if (strncmp(g_argv[i], key, n) == 0 && g_argv[i][n] == '=') return g_argv[i] + n + 1;
    return NULL;
}

/* A numeric argument; `full` or `quick` when not given. */
static long arg_long(const char *key, long full, long quick) {
    const char *v = arg_raw(key);
    if (v) return atol(v);
    return g_quick ? quick : full;
}

__attribute__((unused)) static const char *arg_str(const char *key, const char *def) {
    const char *v = arg_raw(key);
    return v ? v : def;
}

/* ---- failure --------------------------------------------------------------------- */

static void die(const char *fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n < 0) n = 0;
    if (n > (int)sizeof buf - 2) n = (int)sizeof buf - 2;
    buf[n++] = '\n';
    ssize_t w = write(2, buf, (size_t)n);
    (void)w;
    exit(2);
}

#define CHECK_ALLOC(p, n)                                                                \
    do {                                                                                 \
        if ((p) == NULL) die("bench: allocation of %zu bytes failed", (size_t)(n));      \
    } while (0)

/* ---- clock ----------------------------------------------------------------------- */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ---- random numbers (xorshift64*, one state per thread) -------------------------- */

static inline uint64_t rng_next(uint64_t *s) {
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1Dull;
}

static inline uint64_t rng_seed(uint64_t n) {
    /* splitmix64 step, never zero */
    uint64_t z = n + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return z ? z : 1;
}

/* Uniform in [lo, hi]. */
static inline size_t rng_range(uint64_t *s, size_t lo, size_t hi) {
    return lo + (size_t)((rng_next(s) >> 11) % (hi - lo + 1));
}

/* ---- memory figures -------------------------------------------------------------- */

static long read_small_file(const char *path, char *buf, size_t cap) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    size_t got = 0;
    while (got < cap - 1) {
        ssize_t r = read(fd, buf + got, cap - 1 - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        got += (size_t)r;
    }
    close(fd);
    buf[got] = 0;
    return (long)got;
}

/* Resident set in KiB, from /proc/self/statm (second field, in pages). */
static long rss_kib(void) {
    char buf[256];
    if (read_small_file("/proc/self/statm", buf, sizeof buf) <= 0) return -1;
    char *p = buf;
    strtol(p, &p, 10);
    long pages = strtol(p, &p, 10);
    return pages * (sysconf(_SC_PAGESIZE) / 1024);
}

/* Peak resident set (VmHWM) in KiB, from /proc/self/status. */
static long hwm_kib(void) {
    char buf[4096];
    if (read_small_file("/proc/self/status", buf, sizeof buf) <= 0) return -1;
    char *p = strstr(buf, "VmHWM:");
    return p ? atol(p + 6) : -1;
}

/* ---- the result line ------------------------------------------------------------- */

static char g_line[2048];
static size_t g_len;

static void result_add(const char *fmt, ...) {
    if (g_len >= sizeof g_line - 2) return;
    g_line[g_len++] = ' ';
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(g_line + g_len, sizeof g_line - g_len, fmt, ap);
    va_end(ap);
    if (n > 0) g_len += (size_t)n < sizeof g_line - g_len ? (size_t)n : sizeof g_line - g_len - 1;
}

static void result_begin(const char *workload) {
    g_len = (size_t)snprintf(g_line, sizeof g_line, "RESULT workload=%s api=%s", workload, B_API);
    if (g_quick) result_add("quick=1");
}

/* Appends the peak and current RSS and writes the line with one write(2). */
static void result_end(void) {
    result_add("hwm_kib=%ld", hwm_kib());
    result_add("rss_end_kib=%ld", rss_kib());
    if (g_len > sizeof g_line - 2) g_len = sizeof g_line - 2;
    g_line[g_len++] = '\n';
    ssize_t w = write(1, g_line, g_len);
    (void)w;
}

/* Writes a few bytes into a fresh block so the memory is really used. */
static inline void touch(void *p, size_t n) {
    volatile unsigned char *c = (volatile unsigned char *)p;
    c[0] = (unsigned char)n;
    c[n - 1] = (unsigned char)(n >> 3);
}

/* A few allocations before a retention measurement starts, so the allocator's one-time
 * set-up (its first thread heap, its first pages) is not counted as retention. */
__attribute__((unused)) static void warm_up_allocator(void) {
    for (int i = 0; i < 64; i++) {
        void *p = B_MALLOC(64);
        CHECK_ALLOC(p, 64);
        touch(p, 64);
        B_FREE(p);
    }
}

/* ---- single-producer single-consumer queue of pointers --------------------------- */
/* Lives in static storage (never in the allocator being measured). */

#define SPSC_CAP 4096 /* power of two */

struct spsc {
    _Alignas(CACHE_LINE) atomic_size_t head; /* consumer side */
    size_t tail_seen;
    _Alignas(CACHE_LINE) atomic_size_t tail; /* producer side */
    size_t head_seen;
    _Alignas(CACHE_LINE) void *slot[SPSC_CAP];
};

/* Producer: pushes all `n` items, or none (returns 0) when they do not fit. One
 * release store publishes the whole batch. */
static inline int spsc_push_n(struct spsc *q, void *const *items, size_t n) {
    size_t t = atomic_load_explicit(&q->tail, memory_order_relaxed);
    if (t + n - q->head_seen > SPSC_CAP) {
        q->head_seen = atomic_load_explicit(&q->head, memory_order_acquire);
        if (t + n - q->head_seen > SPSC_CAP) return 0;
    }
    for (size_t i = 0; i < n; i++) q->slot[(t + i) & (SPSC_CAP - 1)] = items[i];
    atomic_store_explicit(&q->tail, t + n, memory_order_release);
    return 1;
}

/* Consumer: takes up to `max` items into `out`, returns how many. */
static inline size_t spsc_pop_n(struct spsc *q, void **out, size_t max) {
    size_t h = atomic_load_explicit(&q->head, memory_order_relaxed);
    if (h == q->tail_seen) {
        q->tail_seen = atomic_load_explicit(&q->tail, memory_order_acquire);
        if (h == q->tail_seen) return 0;
    }
    size_t n = q->tail_seen - h;
    if (n > max) n = max;
    for (size_t i = 0; i < n; i++) out[i] = q->slot[(h + i) & (SPSC_CAP - 1)];
    atomic_store_explicit(&q->head, h + n, memory_order_release);
    return n;
}

static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }

/* Waiting for the other thread: spin a little, then yield the core (the machine may
 * have fewer free cores than threads, and a spinning waiter would hold the one the
 * other thread needs). */
static inline void backoff(unsigned *spins) {
    if (++*spins < 100) {
        cpu_relax();
    } else {
        sched_yield();
        *spins = 0;
    }
}

/* ---- threads --------------------------------------------------------------------- */

__attribute__((unused)) static pthread_t start_thread(void *(*fn)(void *), void *arg, size_t stack) {
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    if (stack) pthread_attr_setstacksize(&attr, stack);
    pthread_t t;
    int e = pthread_create(&t, &attr, fn, arg);
    pthread_attr_destroy(&attr);
    if (e) die("bench: pthread_create failed: %s", strerror(e));
    return t;
}

#endif
