/* pthread keys with destructors that allocate and free. More than 32 keys, so glibc
 * keeps the values of the upper keys in a block it allocates itself (through calloc:
 * lgmalloc in override builds) and frees at thread exit. The destructors run at thread
 * exit, in any order relative to lgmalloc's own per-thread cleanup; some re-set their
 * key so they run again in a second destructor round.
 */
#define _GNU_SOURCE
#include <limits.h>
#include <pthread.h>
#include <string.h>

#include "check.h"

enum { KEYS = 48, THREADS = 8, ROUNDS = 5 };

struct value {
    uint64_t magic;
    int key;
    int pass;
    size_t size;
};
#define VALUE_MAGIC 0x7473646b65797321ull

static pthread_key_t keys[KEYS];
static atomic_int destructor_calls, second_pass_calls;

static struct value *new_value(int key, int pass) {
    size_t size = sizeof(struct value) + (size_t)key * 24 + (size_t)pass * 1000;
    struct value *v = T_MALLOC(size);
    REQUIRE(v != NULL, "allocation of a key value failed");
    v->magic = VALUE_MAGIC;
    v->key = key;
    v->pass = pass;
    v->size = size;
    fill_pattern(v + 1, size - sizeof *v, (uint64_t)key * 10 + (uint64_t)pass);
    return v;
}

static void destructor(void *arg) {
    struct value *v = arg;
    REQUIRE(v->magic == VALUE_MAGIC, "destructor got a corrupt value %p", arg);
    size_t bad = find_pattern_mismatch(v + 1, v->size - sizeof *v, (uint64_t)v->key * 10 + (uint64_t)v->pass);
    CHECK(bad == SIZE_MAX, "value of key %d (pass %d) corrupt at %zu", v->key, v->pass, bad);
    CHECK(lg_usable_size(v) >= v->size, "value of key %d: usable %zu < %zu", v->key, lg_usable_size(v),
          v->size);
    /* Allocate and free while the thread is being torn down. */
    void *tmp[4];
    for (int i = 0; i < 4; i++) {
        tmp[i] = (i & 1) ? T_CALLOC(3, 100 + (size_t)i) : T_MALLOC(64 << i);
        REQUIRE(tmp[i] != NULL, "allocation in a key destructor failed");
        memset(tmp[i], 0xee, 64);
    }
    tmp[0] = T_REALLOC(tmp[0], 5000);
    REQUIRE(tmp[0] != NULL, "realloc in a key destructor failed");
    for (int i = 0; i < 4; i++)
        T_FREE(tmp[i]);
    atomic_fetch_add(&destructor_calls, 1);
    if (v->pass == 0 && v->key % 4 == 0) {
        /* A new value: pthread_exit runs the destructors again for it. */
        int rc = pthread_setspecific(keys[v->key], new_value(v->key, 1));
        CHECK(rc == 0, "pthread_setspecific in a destructor failed: %d", rc);
    } else if (v->pass == 1) {
        atomic_fetch_add(&second_pass_calls, 1);
    }
    T_FREE(v);
}

static void *worker(void *arg) {
    (void)arg;
    for (int k = 0; k < KEYS; k++) {
        struct value *v = new_value(k, 0);
        REQUIRE(pthread_setspecific(keys[k], v) == 0, "pthread_setspecific(key %d) failed", k);
    }
    for (int k = 0; k < KEYS; k++) {
        struct value *v = pthread_getspecific(keys[k]);
        CHECK(v != NULL && v->key == k, "pthread_getspecific(key %d) = %p", k, (void *)v);
    }
    return NULL;
}

/* A destructor that allocates in glibc's last destructor round, after lgmalloc's own
 * cleanup ran in that round (or found nothing to do: `late_only_last`, a thread that
 * allocates nothing before that round), leaves the thread a heap nobody gives up. A
 * thread started later on the same stack gets the same thread id: it must not take that
 * heap's pages for its own. It frees the blocks the destructor allocated last, before it
 * allocates anything (`free_first`) or after, then allocates and frees through the same
 * classes. */
enum { LATE_BLOCKS = 3000, LATE_STACK = 3 << 20 /* a stack size no other thread has */ };
static pthread_key_t late_key;
static void *late_blocks[LATE_BLOCKS];
static int late_passes, late_only_last;
static pthread_t late_id;

static size_t late_size(int i) { return 16 + (size_t)(i % 24) * 40; }

static void late_destructor(void *arg) {
    (void)arg;
    late_passes++;
    /* Each pass replaces the blocks, so the last pass's are the ones left. */
    for (int i = 0; i < LATE_BLOCKS && (!late_only_last || late_passes == PTHREAD_DESTRUCTOR_ITERATIONS);
         i++) {
        T_FREE(late_blocks[i]);
        late_blocks[i] = T_MALLOC(late_size(i));
        REQUIRE(late_blocks[i] != NULL, "allocation in the late destructor failed");
        fill_pattern(late_blocks[i], late_size(i), (uint64_t)i);
    }
    /* Run again in the next round, up to the last. */
    pthread_setspecific(late_key, (void *)1);
}

static void *late_thread(void *arg) {
    (void)arg;
    late_id = pthread_self();
    pthread_setspecific(late_key, (void *)1);
    return NULL;
}

static void *successor(void *arg) {
    int free_first = (int)(intptr_t)arg;
    if (!pthread_equal(pthread_self(), late_id)) {
        fprintf(stderr, "the successor did not get the exited thread's id\n");
        return (void *)1;
    }
    intptr_t bad = 0;
    void *mine[LATE_BLOCKS];
    for (int round = 0; round < 5; round++) {
        if (round > 0 || !free_first)
            for (int i = 0; i < LATE_BLOCKS; i++) {
                mine[i] = T_MALLOC(late_size(i));
                if (!mine[i])
                    return (void *)1;
                fill_pattern(mine[i], late_size(i), (uint64_t)(i + round));
            }
        if (round == 0)
            for (int i = 0; i < LATE_BLOCKS; i++) {
                if (find_pattern_mismatch(late_blocks[i], late_size(i), (uint64_t)i) != SIZE_MAX)
                    bad++;
                T_FREE(late_blocks[i]);
                late_blocks[i] = NULL;
            }
        if (round > 0 || !free_first)
            for (int i = 0; i < LATE_BLOCKS; i++) {
                if (find_pattern_mismatch(mine[i], late_size(i), (uint64_t)(i + round)) != SIZE_MAX)
                    bad++;
                T_FREE(mine[i]);
            }
    }
    return (void *)bad;
}

static void check_heap_left_by_last_destructor_round(void) {
    REQUIRE(pthread_key_create(&late_key, late_destructor) == 0, "pthread_key_create failed");
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, LATE_STACK);
    /* Without that care, whether the successor's lists break (and a later free is
     * reported as misuse, or it crashes) depends on where the blocks landed: several
     * rounds. */
    for (int round = 0; round < 32; round++) {
        pthread_t t;
        late_passes = 0;
        late_only_last = (round >> 1) & 1;
        REQUIRE(pthread_create(&t, &attr, late_thread, NULL) == 0, "pthread_create failed");
        pthread_join(t, NULL);
        CHECK(late_passes == PTHREAD_DESTRUCTOR_ITERATIONS, "the late destructor ran %d times",
              late_passes);
        void *ret = (void *)1;
        REQUIRE(pthread_create(&t, &attr, successor, (void *)(intptr_t)(round & 1)) == 0,
                "pthread_create failed");
        pthread_join(t, &ret);
        CHECK(ret == NULL, "successor (%s, %s): %ld failures",
              (round & 1) ? "frees first" : "allocates first",
              late_only_last ? "blocks of the last round only" : "blocks of every round",
              (long)(intptr_t)ret);
    }
    pthread_attr_destroy(&attr);
    pthread_key_delete(late_key);
}

int main(void) {
    printf("tsd_keys: %d keys, %d threads x %d rounds through %s\n", KEYS, THREADS, ROUNDS, T_API);
    unsigned max_key = 0;
    for (int k = 0; k < KEYS; k++) {
        REQUIRE(pthread_key_create(&keys[k], destructor) == 0, "pthread_key_create #%d failed", k);
        if ((unsigned)keys[k] > max_key)
            max_key = (unsigned)keys[k];
    }
    CHECK(max_key >= 32, "the keys end at %u: the second-level key storage is not exercised", max_key);
    for (int round = 0; round < ROUNDS; round++) {
        pthread_t t[THREADS];
        for (int i = 0; i < THREADS; i++)
            REQUIRE(pthread_create(&t[i], NULL, worker, NULL) == 0, "pthread_create failed");
        for (int i = 0; i < THREADS; i++)
            pthread_join(t[i], NULL);
    }
    int per_thread = KEYS + (KEYS + 3) / 4;
    CHECK(atomic_load(&destructor_calls) == ROUNDS * THREADS * per_thread,
          "%d destructor calls, expected %d", atomic_load(&destructor_calls),
          ROUNDS * THREADS * per_thread);
    CHECK(atomic_load(&second_pass_calls) == ROUNDS * THREADS * ((KEYS + 3) / 4),
          "%d second-pass destructor calls, expected %d", atomic_load(&second_pass_calls),
          ROUNDS * THREADS * ((KEYS + 3) / 4));
    for (int k = 0; k < KEYS; k++)
        pthread_key_delete(keys[k]);
    check_heap_left_by_last_destructor_round();
    /* The allocator still works in the main thread. */
    void *p = T_MALLOC(4096);
    CHECK(p != NULL, "allocation after the rounds failed");
    T_FREE(p);
    return check_summary("tsd_keys");
}
