/* pthread keys with destructors that allocate and free. More than 32 keys, so glibc
 * keeps the values of the upper keys in a block it allocates itself (through calloc:
 * lgmalloc in override builds) and frees at thread exit. The destructors run at thread
 * exit, in any order relative to lgmalloc's own per-thread cleanup; some re-set their
 * key so they run again in a second destructor round.
 */
#define _GNU_SOURCE
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
    /* The allocator still works in the main thread. */
    void *p = T_MALLOC(4096);
    CHECK(p != NULL, "allocation after the rounds failed");
    T_FREE(p);
    return check_summary("tsd_keys");
}
