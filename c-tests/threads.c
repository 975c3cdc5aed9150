/* Eight threads allocate blocks of mixed sizes, stamp them, and hand them to each other
 * through one bounded ring; whoever takes a block verifies it, sometimes reallocates it,
 * and frees it (so most frees are cross-thread frees). Every thread also keeps a window
 * of private blocks that it frees itself. At the end the number of blocks freed must
 * equal the number allocated, and no block may have been corrupted.
 *
 * Built with the lg_* API against both lgmalloc::lgmalloc and lgmalloc::lgmalloc_static,
 * and (override builds) with the C names.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <string.h>

#include "check.h"

enum { THREADS = 8, OPS = 25000, RING = 1024, WINDOW = 64 };

struct header {
    uint64_t magic;
    uint64_t seed;
    size_t size;
    uint32_t owner;
    uint32_t pad;
};
#define MAGIC 0x6c676d616c6c6f63ull /* "lgmalloc" */

static struct {
    pthread_mutex_t lock;
    pthread_cond_t not_empty, not_full;
    void *slot[RING];
    size_t head, count;
    int producers_left;
} ring = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER,
          {0}, 0, 0, THREADS};

static atomic_ullong allocated, freed;

static void ring_put(void *p) {
    pthread_mutex_lock(&ring.lock);
    while (ring.count == RING)
        pthread_cond_wait(&ring.not_full, &ring.lock);
    ring.slot[(ring.head + ring.count) % RING] = p;
    ring.count++;
    pthread_cond_signal(&ring.not_empty);
    pthread_mutex_unlock(&ring.lock);
}

/* Non-blocking take; NULL when empty. */
static void *ring_try_take(void) {
    void *p = NULL;
    pthread_mutex_lock(&ring.lock);
    if (ring.count > 0) {
        p = ring.slot[ring.head];
        ring.head = (ring.head + 1) % RING;
        ring.count--;
        pthread_cond_signal(&ring.not_full);
    }
    pthread_mutex_unlock(&ring.lock);
    return p;
}

static size_t pick_size(uint64_t *rng) {
    uint64_t r = rng_next(rng);
    switch (r % 100) {
    case 0:
        return (size_t)(r >> 20) % (1u << 20) + 64 * 1024; /* 64 KiB .. 1 MiB */
    case 1: case 2: case 3: case 4:
        return (size_t)(r >> 20) % 32768 + 4096;
    default:
        return (size_t)(r >> 20) % 1000 + sizeof(struct header);
    }
}

static void *make_block(uint32_t owner, uint64_t *rng) {
    size_t size = pick_size(rng);
    uint64_t seed = rng_next(rng);
    unsigned char *p = T_MALLOC(size);
    REQUIRE(p != NULL, "thread %u: allocation of %zu bytes failed", owner, size);
    CHECK(((uintptr_t)p & 15) == 0, "thread %u: %p not 16-byte aligned", owner, (void *)p);
    CHECK(lg_usable_size(p) >= size, "thread %u: lg_usable_size(%p) = %zu < %zu", owner, (void *)p,
          lg_usable_size(p), size);
    struct header h = {MAGIC, seed, size, owner, 0};
    memcpy(p, &h, sizeof h);
    fill_pattern(p + sizeof h, size - sizeof h, seed);
    atomic_fetch_add(&allocated, 1);
    return p;
}

/* Verify a block; returns its size. */
static size_t verify_block(const void *p, uint32_t me) {
    struct header h;
    memcpy(&h, p, sizeof h);
    REQUIRE(h.magic == MAGIC, "thread %u: block %p has a corrupt header (magic %llx)", me, p,
            (unsigned long long)h.magic);
    size_t bad = find_pattern_mismatch((const unsigned char *)p + sizeof h, h.size - sizeof h, h.seed);
    CHECK(bad == SIZE_MAX, "thread %u: block %p (%zu bytes from thread %u) corrupt at offset %zu", me,
          p, h.size, h.owner, bad + sizeof h);
    return h.size;
}

static void consume(void *p, uint32_t me, uint64_t *rng) {
    size_t size = verify_block(p, me);
    if (rng_next(rng) % 8 == 0) {
        /* Cross-thread realloc: grow the other thread's block, check, then free. */
        unsigned char *q = T_REALLOC(p, size * 2 + 16);
        REQUIRE(q != NULL, "thread %u: realloc to %zu failed", me, size * 2 + 16);
        verify_block(q, me);
        p = q;
    }
    T_FREE(p);
    atomic_fetch_add(&freed, 1);
}

static void *worker(void *arg) {
    uint32_t me = (uint32_t)(uintptr_t)arg;
    uint64_t rng = 0x1234567ull * (me + 1) + 1;
    void *window[WINDOW] = {0};
    for (int op = 0; op < OPS; op++) {
        /* A private block, freed by this thread later. */
        int w = (int)(rng_next(&rng) % WINDOW);
        if (window[w]) {
            verify_block(window[w], me);
            T_FREE(window[w]);
            atomic_fetch_add(&freed, 1);
        }
        window[w] = make_block(me, &rng);
        /* A shared block for someone else, and take one if there is one. */
        ring_put(make_block(me, &rng));
        void *p = ring_try_take();
        if (p)
            consume(p, me, &rng);
    }
    for (int w = 0; w < WINDOW; w++)
        if (window[w]) {
            verify_block(window[w], me);
            T_FREE(window[w]);
            atomic_fetch_add(&freed, 1);
        }
    /* Drain until every producer is done and the ring is empty. */
    pthread_mutex_lock(&ring.lock);
    ring.producers_left--;
    pthread_cond_broadcast(&ring.not_empty);
    pthread_mutex_unlock(&ring.lock);
    for (;;) {
        void *p = ring_try_take();
        if (p) {
            consume(p, me, &rng);
            continue;
        }
        pthread_mutex_lock(&ring.lock);
        int done = ring.producers_left == 0 && ring.count == 0;
        pthread_mutex_unlock(&ring.lock);
        if (done)
            break;
        sched_yield();
    }
    return NULL;
}

int main(void) {
    printf("threads: %d threads x %d ops through %s\n", THREADS, OPS, T_API);
    pthread_t t[THREADS];
    for (uintptr_t i = 0; i < THREADS; i++)
        REQUIRE(pthread_create(&t[i], NULL, worker, (void *)i) == 0, "pthread_create failed");
    for (int i = 0; i < THREADS; i++)
        pthread_join(t[i], NULL);
    unsigned long long a = atomic_load(&allocated), f = atomic_load(&freed);
    CHECK(a == f, "%llu blocks allocated but %llu freed", a, f);
    CHECK(ring.count == 0, "%zu blocks left in the ring", ring.count);
    struct lg_stats s;
    lg_stats(&s);
    CHECK(s.alloc_count >= a, "lg_stats alloc_count %llu < %llu allocations made",
          (unsigned long long)s.alloc_count, a);
    return check_summary("threads");
}
