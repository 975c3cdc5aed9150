// The throwing forms of operator new, served by lgmalloc's override, must follow the
// C++ rules on failure: call the installed new-handler (repeatedly, while it returns),
// and throw std::bad_alloc when there is none. Aborting is not conforming.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <new>

#include <lgmalloc.h>

static int failures;
#define CHECK(cond, ...)                                                                  \
    do {                                                                                  \
        if (!(cond)) {                                                                    \
            failures++;                                                                   \
            std::fprintf(stderr, "%s:%d: FAIL: %s: ", __FILE__, __LINE__, #cond);         \
            std::fprintf(stderr, __VA_ARGS__);                                            \
            std::fputc('\n', stderr);                                                     \
        }                                                                                 \
    } while (0)

static int handler_calls;
static void handler() {
    // Give up after three calls: uninstall, so the next failure throws.
    if (++handler_calls >= 3)
        std::set_new_handler(nullptr);
}

template <class F> static void expect_bad_alloc(const char *what, F f) {
    bool thrown = false;
    try {
        void *p = f();
        std::fprintf(stderr, "%s returned %p\n", what, p);
    } catch (const std::bad_alloc &) {
        thrown = true;
    }
    CHECK(thrown, "%s did not throw std::bad_alloc", what);
}

int main() {
    volatile size_t huge = SIZE_MAX / 2;
    expect_bad_alloc("operator new(huge)", [&] { return ::operator new(huge); });
    expect_bad_alloc("operator new[](huge)", [&] { return ::operator new[](huge); });
    expect_bad_alloc("operator new(huge, align 64)",
                     [&] { return ::operator new(huge, std::align_val_t(64)); });

    handler_calls = 0;
    std::set_new_handler(handler);
    expect_bad_alloc("operator new(huge) with a new-handler", [&] { return ::operator new(huge); });
    CHECK(handler_calls == 3, "the new-handler ran %d times, expected 3", handler_calls);

    // Still usable afterwards.
    int *p = new int(7);
    CHECK(*p == 7 && lg_usable_size(p) >= sizeof(int), "new int after the failures");
    delete p;
    if (failures) {
        std::fprintf(stderr, "cxx_bad_alloc: %d check(s) failed\n", failures);
        return 1;
    }
    std::printf("cxx_bad_alloc: all checks passed\n");
    return 0;
}
