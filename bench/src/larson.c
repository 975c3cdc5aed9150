/* Larson-style server: objects outlive the thread that allocated them.
 *
 * `chains` independent chains of threads share out a table of `slots` objects each.
 * The main thread fills every table; then each chain runs generations of threads: a
 * thread replaces `rounds` random entries of its table (free + malloc of 16..512 bytes)
 * and then starts its successor, hands it the table and exits. So most frees hit
 * objects allocated by an earlier (often exited) thread, and every allocator must
 * cope with the memory of exited threads. At the end the main thread frees all.
 * Figure: malloc+free pairs per second over all chains (and threads started).
 *
 * `threads=N` (the thread-scaling benchmark) runs N chains at once and shares out among
 * them the work of min(N, cores) chains of `generations` generations each, so an
 * allocator that scales keeps the same run time from `cores` threads on.
 */
#include "bench.h"

/* One cache line per chain, and the array line-aligned: every round writes its chain's
 * `rng`, and chains run at once. Packed at 48 bytes (until 0a56157), chains shared
 * lines, and how much that cost depended on where the allocator under test put the
 * array: lgmalloc at 2 threads ran at 28-31 M pairs/s with the array where its plan
 * put it, 32-45 with prediction off, 70-74 with this layout (mimalloc 3.4.3: 55-59,
 * then 73-76). What was measured was this program's bookkeeping, not the allocator. */
struct __attribute__((aligned(64))) chain {
    void **slot;
    long slots;
    long rounds;
    long generations_left;
    uint64_t rng;
    long ops;
};

static pthread_mutex_t g_done_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_done_cond = PTHREAD_COND_INITIALIZER;
static int g_chains_done;
static atomic_long g_threads;

static void *generation(void *arg) {
    struct chain *c = arg;
    for (long i = 0; i < c->rounds; i++) {
        uint64_t r = rng_next(&c->rng);
        size_t k = (size_t)(r >> 40) % (size_t)c->slots;
        size_t n = 16 + (size_t)(r & 0xffff) % 497;
        B_FREE(c->slot[k]);
        void *p = B_MALLOC(n);
        CHECK_ALLOC(p, n);
        touch(p, n);
        c->slot[k] = p;
    }
    c->ops += c->rounds;
    if (--c->generations_left > 0) {
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_t next;
        int e = pthread_create(&next, &attr, generation, c);
        pthread_attr_destroy(&attr);
        if (e) die("larson: pthread_create failed: %s", strerror(e));
        atomic_fetch_add(&g_threads, 1);
    } else {
        pthread_mutex_lock(&g_done_lock);
        g_chains_done++;
        pthread_cond_signal(&g_done_cond);
        pthread_mutex_unlock(&g_done_lock);
    }
    return NULL;
}

int main(int argc, char **argv) {
    args_init(argc, argv);
    long threads = arg_long("threads", 0, 0);
    long chains = threads > 0 ? threads : arg_long("chains", 4, 4);
    long slots = arg_long("slots", 1000, 1000);
    long rounds = arg_long("rounds", 20000, 20000);
    long generations = arg_long("generations", threads > 0 ? 600 : 300, threads > 0 ? 150 : 40);
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    if (threads > 0) {
        long busy = threads < cores ? threads : cores;
        generations = (generations * busy + threads - 1) / threads;
    }

    struct chain *c = aligned_alloc(64, (size_t)chains * sizeof *c);
    if (!c) die("larson: out of memory");
    memset(c, 0, (size_t)chains * sizeof *c);
    uint64_t rng = rng_seed(7);
    for (long i = 0; i < chains; i++) {
        c[i].slot = B_MALLOC(sizeof(void *) * (size_t)slots);
        CHECK_ALLOC(c[i].slot, 0);
        for (long k = 0; k < slots; k++) {
            size_t n = rng_range(&rng, 16, 512);
            c[i].slot[k] = B_MALLOC(n);
            CHECK_ALLOC(c[i].slot[k], n);
            touch(c[i].slot[k], n);
        }
        c[i].slots = slots;
        c[i].rounds = rounds;
        c[i].generations_left = generations;
        c[i].rng = rng_seed(100 + (uint64_t)i);
    }

    double t0 = now_s();
    for (long i = 0; i < chains; i++) {
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_t t;
        int e = pthread_create(&t, &attr, generation, &c[i]);
        pthread_attr_destroy(&attr);
        if (e) die("larson: pthread_create failed: %s", strerror(e));
        atomic_fetch_add(&g_threads, 1);
    }
    pthread_mutex_lock(&g_done_lock);
    while (g_chains_done < chains) pthread_cond_wait(&g_done_cond, &g_done_lock);
    pthread_mutex_unlock(&g_done_lock);
    double t = now_s() - t0;

    long ops = 0;
    for (long i = 0; i < chains; i++) {
        ops += c[i].ops;
        for (long k = 0; k < slots; k++) B_FREE(c[i].slot[k]);
        B_FREE(c[i].slot);
    }
    long rss_after_free = rss_kib();
    free(c);

    result_begin("larson");
    result_add("chains=%ld", chains);
    result_add("cores=%ld", cores);
    result_add("threads=%ld", atomic_load(&g_threads));
    result_add("ops=%ld", ops);
    result_add("time_s=%.6f", t);
    result_add("mops_per_s=%.3f", (double)ops / t / 1e6);
    result_add("rss_after_free_kib=%ld", rss_after_free);
    result_end();
    return 0;
}
