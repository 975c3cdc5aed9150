/* fork() while other threads allocate. The allocator must hand the child consistent
 * state (no lock held by a thread that does not exist in the child, no half-done list
 * operation): the child allocates, frees, reallocates, starts a thread of its own and
 * exits 0; the parent checks every child and keeps allocating afterwards.
 * A deadlocked child is killed by alarm() and reported as a failure.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"

enum { CHURNERS = 4, FORKS = 40, SLOTS = 64 };

static atomic_int stop;
static atomic_ullong churn_ops;

static size_t churn_size(uint64_t *rng) {
    uint64_t r = rng_next(rng);
    if (r % 50 == 0)
        return (size_t)(r >> 16) % (512 * 1024) + 1; /* sometimes large */
    return (size_t)(r >> 16) % 2048 + 1;
}

static void *churn(void *arg) {
    uint64_t rng = (uint64_t)(uintptr_t)arg * 7919 + 17;
    void *slot[SLOTS] = {0};
    size_t size[SLOTS] = {0};
    uint64_t seed[SLOTS] = {0};
    while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
        int i = (int)(rng_next(&rng) % SLOTS);
        if (slot[i]) {
            size_t bad = find_pattern_mismatch(slot[i], size[i], seed[i]);
            CHECK(bad == SIZE_MAX, "parent churn: block of %zu corrupt at %zu", size[i], bad);
            T_FREE(slot[i]);
        }
        size[i] = churn_size(&rng);
        seed[i] = rng_next(&rng);
        slot[i] = (rng_next(&rng) & 1) ? T_MALLOC(size[i]) : T_CALLOC(1, size[i]);
        REQUIRE(slot[i] != NULL, "parent churn: allocation of %zu failed", size[i]);
        fill_pattern(slot[i], size[i], seed[i]);
        atomic_fetch_add_explicit(&churn_ops, 1, memory_order_relaxed);
    }
    for (int i = 0; i < SLOTS; i++)
        T_FREE(slot[i]);
    return NULL;
}

/* Work done in a child; returns the number of failures (the exit status). */
static int child_round(uint64_t seed0) {
    int bad = 0;
    uint64_t rng = seed0 | 1;
    enum { N = 2000 };
    static void *p[N];
    static size_t sz[N];
    for (int i = 0; i < N; i++) {
        sz[i] = churn_size(&rng);
        p[i] = T_MALLOC(sz[i]);
        if (!p[i]) {
            fprintf(stderr, "child: allocation of %zu failed\n", sz[i]);
            return 1;
        }
        fill_pattern(p[i], sz[i], (uint64_t)i);
    }
    for (int i = 0; i < N; i += 3) {
        void *q = T_REALLOC(p[i], sz[i] * 2);
        if (!q) {
            fprintf(stderr, "child: realloc to %zu failed\n", sz[i] * 2);
            return 1;
        }
        p[i] = q;
    }
    for (int i = 0; i < N; i++) {
        if (find_pattern_mismatch(p[i], sz[i], (uint64_t)i) != SIZE_MAX) {
            fprintf(stderr, "child: block %d (%zu bytes) corrupt\n", i, sz[i]);
            bad++;
        }
        T_FREE(p[i]);
    }
    unsigned char *z = T_CALLOC(1000, 16);
    if (!z)
        return 1;
    for (int i = 0; i < 16000; i++)
        if (z[i] != 0) {
            fprintf(stderr, "child: calloc byte %d not zero\n", i);
            bad++;
            break;
        }
    T_FREE(z);
    return bad;
}

static void *child_thread(void *arg) {
    return (void *)(intptr_t)child_round((uint64_t)(uintptr_t)arg);
}

/* A thread the child starts may get the control block, and so the thread id, of one of
 * the parent's other threads (glibc hands their stacks to new threads): it must not take
 * that thread's pages for its own. The parent's holder thread allocates blocks of
 * several sizes (its pages full and partly full) and waits; the child starts a thread
 * with the holder's stack size, which glibc serves from the holder's stack, checks that
 * it got the holder's id, and frees every block: before it allocates anything
 * (`free_first`), or after. */
enum { HELD = 3000, REUSE_STACK = 3 << 20 /* a stack size no other thread has */ };
static void *held[HELD];
static pthread_t holder_id;
static pthread_mutex_t hold_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t hold_cond = PTHREAD_COND_INITIALIZER;
static int hold_state; /* 1: the blocks are allocated; 2: the holder may finish */

static size_t held_size(int i) { return 16 + (size_t)(i % 24) * 40; }

static void *holder(void *arg) {
    (void)arg;
    for (int i = 0; i < HELD; i++) {
        held[i] = T_MALLOC(held_size(i));
        REQUIRE(held[i] != NULL, "holder: allocation of %zu failed", held_size(i));
        fill_pattern(held[i], held_size(i), (uint64_t)i);
    }
    pthread_mutex_lock(&hold_lock);
    holder_id = pthread_self();
    hold_state = 1;
    pthread_cond_broadcast(&hold_cond);
    while (hold_state != 2)
        pthread_cond_wait(&hold_cond, &hold_lock);
    pthread_mutex_unlock(&hold_lock);
    return NULL;
}

static void *reuser(void *arg) {
    int free_first = (int)(intptr_t)arg;
    if (!pthread_equal(pthread_self(), holder_id)) {
        fprintf(stderr, "child: the new thread did not get the holder's thread id\n");
        return (void *)1;
    }
    intptr_t bad = 0;
    void *mine[HELD];
    if (!free_first)
        for (int i = 0; i < HELD; i++) {
            mine[i] = T_MALLOC(held_size(i));
            if (!mine[i])
                return (void *)1;
            fill_pattern(mine[i], held_size(i), (uint64_t)i + HELD);
        }
    for (int i = 0; i < HELD; i++) {
        if (find_pattern_mismatch(held[i], held_size(i), (uint64_t)i) != SIZE_MAX)
            bad++;
        T_FREE(held[i]);
    }
    /* Churn through the same classes. */
    for (int round = 0; round < 4; round++) {
        for (int i = 0; i < HELD; i++) {
            if (free_first || round > 0) {
                mine[i] = T_MALLOC(held_size(i));
                if (!mine[i])
                    return (void *)1;
                fill_pattern(mine[i], held_size(i), (uint64_t)(i + round));
            }
        }
        for (int i = 0; i < HELD; i++) {
            uint64_t seed = (!free_first && round == 0) ? (uint64_t)i + HELD : (uint64_t)(i + round);
            if (find_pattern_mismatch(mine[i], held_size(i), seed) != SIZE_MAX)
                bad++;
            T_FREE(mine[i]);
        }
    }
    return (void *)bad;
}

static void check_child_thread_reusing_an_id(void) {
    hold_state = 0;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, REUSE_STACK);
    pthread_t h;
    REQUIRE(pthread_create(&h, &attr, holder, NULL) == 0, "pthread_create failed");
    pthread_mutex_lock(&hold_lock);
    while (hold_state != 1)
        pthread_cond_wait(&hold_cond, &hold_lock);
    pthread_mutex_unlock(&hold_lock);
    for (int free_first = 0; free_first < 2; free_first++) {
        pid_t pid = fork();
        REQUIRE(pid >= 0, "fork failed");
        if (pid == 0) {
            alarm(30);
            pthread_t r;
            void *ret = (void *)1;
            if (pthread_create(&r, &attr, reuser, (void *)(intptr_t)free_first) != 0 ||
                pthread_join(r, &ret) != 0)
                _exit(1);
            _exit(ret ? 1 : 0);
        }
        int status = 0;
        REQUIRE(waitpid(pid, &status, 0) == pid, "waitpid failed");
        CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0,
              "child thread with the holder's id (%s): %s %d",
              free_first ? "frees first" : "allocates first",
              WIFEXITED(status) ? "exit status" : "killed by signal",
              WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
    }
    pthread_mutex_lock(&hold_lock);
    hold_state = 2;
    pthread_cond_broadcast(&hold_cond);
    pthread_mutex_unlock(&hold_lock);
    pthread_join(h, NULL);
    pthread_attr_destroy(&attr);
    /* The parent's copies are intact and still the holder's to free. */
    for (int i = 0; i < HELD; i++) {
        CHECK(find_pattern_mismatch(held[i], held_size(i), (uint64_t)i) == SIZE_MAX,
              "parent: held block %d corrupt", i);
        T_FREE(held[i]);
    }
}

int main(void) {
    printf("fork: %d forks while %d threads allocate through %s\n", FORKS, CHURNERS, T_API);
    pthread_t t[CHURNERS];
    for (uintptr_t i = 0; i < CHURNERS; i++)
        REQUIRE(pthread_create(&t[i], NULL, churn, (void *)(i + 1)) == 0, "pthread_create failed");
    for (int f = 0; f < FORKS; f++) {
        usleep(2000); /* let the churners get going */
        pid_t pid = fork();
        REQUIRE(pid >= 0, "fork failed");
        if (pid == 0) {
            alarm(30); /* a deadlock in the child becomes SIGALRM */
            int bad = child_round((uint64_t)f * 31 + 5);
            pthread_t ct;
            void *ret = (void *)1;
            if (pthread_create(&ct, NULL, child_thread, (void *)(uintptr_t)(f + 100)) != 0 ||
                pthread_join(ct, &ret) != 0)
                bad++;
            bad += (int)(intptr_t)ret;
            _exit(bad ? 1 : 0);
        }
        int status = 0;
        REQUIRE(waitpid(pid, &status, 0) == pid, "waitpid failed");
        CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0,
              "child %d: %s %d", f, WIFEXITED(status) ? "exit status" : "killed by signal",
              WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
        /* The parent keeps allocating between forks. */
        void *p = T_MALLOC(100 + (size_t)f);
        REQUIRE(p != NULL, "parent: allocation after fork %d failed", f);
        memset(p, f, 100);
        T_FREE(p);
    }
    atomic_store(&stop, 1);
    for (int i = 0; i < CHURNERS; i++)
        pthread_join(t[i], NULL);
    CHECK(atomic_load(&churn_ops) > 0, "the churn threads never allocated");
    CHECK(child_round(99) == 0, "parent: allocation round after the forks failed");
    /* Several holders: without the care this checks, whether a child's lists break
     * (and a later free is reported as misuse) depends on where the holder's blocks
     * landed; about half of the holders showed it. */
    for (int i = 0; i < 8; i++)
        check_child_thread_reusing_an_id();
    return check_summary("fork");
}
