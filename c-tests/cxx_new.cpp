// C++ operator new/delete through lgmalloc's override (scalar, array, nothrow, aligned,
// sized delete) and the standard library's containers. Every allocation must come from
// lgmalloc: lg_stats().alloc_count moves and lg_usable_size() knows the block.
// Built against lgmalloc::lgmalloc and lgmalloc::lgmalloc_static.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <new>
#include <string>
#include <vector>

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

static uint64_t allocs() {
    static struct lg_stats s; // large struct: keep it off the stack
    lg_stats(&s);
    return s.alloc_count;
}

// Check a block just returned by some form of operator new.
static void owned(const char *what, void *p, size_t size, size_t align, uint64_t before) {
    CHECK(p != nullptr, "%s returned nullptr", what);
    if (!p)
        return;
    uint64_t after = allocs();
    CHECK(after > before, "%s did not go through lgmalloc (alloc_count %llu -> %llu)", what,
          (unsigned long long)before, (unsigned long long)after);
    if (after <= before)
        return; // lg_usable_size of a foreign block would be meaningless
    CHECK(lg_usable_size(p) >= size, "%s: lg_usable_size %zu < %zu", what, lg_usable_size(p), size);
    CHECK(reinterpret_cast<uintptr_t>(p) % align == 0, "%s = %p is not %zu-aligned", what, p, align);
    std::memset(p, 0xab, size);
}

struct alignas(64) Line {
    unsigned char bytes[64];
};
struct alignas(4096) Page {
    unsigned char bytes[4096];
};
struct Node {
    int v;
    Node *next;
};

int main() {
    uint64_t b;

    b = allocs();
    Node *n = new Node{1, nullptr};
    owned("new Node", n, sizeof(Node), alignof(Node), b);
    delete n;

    b = allocs();
    int *arr = new int[1000];
    owned("new int[1000]", arr, 1000 * sizeof(int), alignof(int), b);
    delete[] arr;

    b = allocs();
    Node *nn = new (std::nothrow) Node{2, nullptr};
    owned("new (nothrow) Node", nn, sizeof(Node), alignof(Node), b);
    delete nn;

    b = allocs();
    char *na = new (std::nothrow) char[5000];
    owned("new (nothrow) char[5000]", na, 5000, 1, b);
    delete[] na;

    b = allocs();
    Line *line = new Line;
    owned("new Line (align 64)", line, sizeof(Line), 64, b);
    delete line;

    b = allocs();
    Page *pages = new Page[3];
    owned("new Page[3] (align 4096)", pages, 3 * sizeof(Page), 4096, b);
    delete[] pages;

    b = allocs();
    Page *np = new (std::nothrow) Page;
    owned("new (nothrow) Page", np, sizeof(Page), 4096, b);
    delete np;

    // The operator functions called directly, with sized and aligned deletes.
    b = allocs();
    void *p = ::operator new(100);
    owned("operator new(100)", p, 100, 16, b);
    ::operator delete(p, 100);

    b = allocs();
    p = ::operator new[](300);
    owned("operator new[](300)", p, 300, 16, b);
    ::operator delete[](p, 300);

    b = allocs();
    p = ::operator new(100, std::align_val_t(256));
    owned("operator new(100, align 256)", p, 100, 256, b);
    ::operator delete(p, 100, std::align_val_t(256));

    b = allocs();
    p = ::operator new[](5000, std::align_val_t(1 << 20), std::nothrow);
    owned("operator new[](5000, align 1 MiB, nothrow)", p, 5000, 1 << 20, b);
    ::operator delete[](p, std::align_val_t(1 << 20), std::nothrow);

    b = allocs();
    p = ::operator new(0);
    owned("operator new(0)", p, 0, 16, b);
    ::operator delete(p);

    // nothrow forms return nullptr on failure instead of throwing.
    volatile size_t huge = SIZE_MAX / 2;
    CHECK(::operator new(huge, std::nothrow) == nullptr, "operator new(huge, nothrow) returned a block");
    CHECK(::operator new[](huge, std::nothrow) == nullptr, "operator new[](huge, nothrow) returned a block");
    CHECK(::operator new(huge, std::align_val_t(64), std::nothrow) == nullptr,
          "operator new(huge, align 64, nothrow) returned a block");

    // Containers.
    b = allocs();
    {
        std::vector<std::string> v;
        for (int i = 0; i < 10000; i++)
            v.push_back("a string long enough to be on the heap #" + std::to_string(i));
        std::map<int, std::unique_ptr<Node>> m;
        for (int i = 0; i < 5000; i++)
            m[i] = std::make_unique<Node>(Node{i, nullptr});
        for (int i = 0; i < 10000; i += 997)
            CHECK(v[i] == "a string long enough to be on the heap #" + std::to_string(i), "vector[%d]", i);
        for (int i = 0; i < 5000; i += 499)
            CHECK(m[i]->v == i, "map[%d]", i);
        CHECK(lg_usable_size(v.data()) >= v.size() * sizeof(std::string), "vector storage not from lgmalloc");
    }
    uint64_t a = allocs();
    CHECK(a >= b + 20000, "containers made %llu allocations through lgmalloc, expected >= 20000",
          (unsigned long long)(a - b));

    if (failures) {
        std::fprintf(stderr, "cxx_new: %d check(s) failed\n", failures);
        return 1;
    }
    std::printf("cxx_new: all checks passed\n");
    return 0;
}
