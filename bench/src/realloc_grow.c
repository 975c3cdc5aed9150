/* realloc growth: many buffers growing a little at a time, as strings and logs do.
 *
 * `buffers` buffers grow side by side; each step picks one at random and grows it by
 * 8..128 bytes with realloc, writing the new bytes. A buffer that reaches its target
 * size (log-uniform between 1 KiB and 256 KiB, drawn when it starts) is checked, freed
 * and started again at 16 bytes. Allocators that grow in place avoid the copies.
 * Figure: reallocs per second.
 */
#include "bench.h"

struct buf {
    unsigned char *p;
    size_t len;
    size_t target;
};

static double g_maxlog = 18;

static size_t draw_target(uint64_t *rng) {
    /* 2^10 .. 2^maxlog, log-uniform */
    double e = 10.0 + (double)(rng_next(rng) >> 11) / 9007199254740992.0 * (g_maxlog - 10.0);
    size_t t = 1;
    for (int i = 0; i < (int)e; i++) t <<= 1;
    return t + (size_t)((double)t * (e - (int)e));
}

int main(int argc, char **argv) {
    args_init(argc, argv);
    long steps = arg_long("steps", 5000000, 800000);
    long buffers = arg_long("buffers", 64, 64);
    g_maxlog = (double)arg_long("maxlog", 18, 18);
    if (g_maxlog < 11 || g_maxlog > 30) die("realloc: maxlog 11..30");
    uint64_t rng = rng_seed(11);
    struct buf *b = calloc((size_t)buffers, sizeof *b);
    if (!b) die("realloc: out of memory");
    for (long i = 0; i < buffers; i++) {
        b[i].len = 16;
        b[i].p = B_MALLOC(16);
        CHECK_ALLOC(b[i].p, 16);
        memset(b[i].p, (int)(i & 0x7f), 16);
        b[i].target = draw_target(&rng);
    }

    long restarts = 0, bad = 0;
    double t0 = now_s();
    for (long s = 0; s < steps; s++) {
        uint64_t r = rng_next(&rng);
        struct buf *x = &b[(r >> 40) % (uint64_t)buffers];
        size_t grow = 8 + (size_t)(r & 0xffff) % 121;
        unsigned char *q = B_REALLOC(x->p, x->len + grow);
        CHECK_ALLOC(q, x->len + grow);
        unsigned char fill = q[0];
        memset(q + x->len, fill, grow);
        x->p = q;
        x->len += grow;
        if (x->len >= x->target) {
            /* the contents must have survived every move */
            if (q[x->len / 2] != fill || q[x->len - 1] != fill) bad++;
            B_FREE(q);
            x->len = 16;
            x->p = B_MALLOC(16);
            CHECK_ALLOC(x->p, 16);
            memset(x->p, (int)(restarts & 0x7f), 16);
            x->target = draw_target(&rng);
            restarts++;
        }
    }
    double t = now_s() - t0;
    for (long i = 0; i < buffers; i++) B_FREE(b[i].p);
    free(b);
    if (bad) die("realloc: %ld buffers lost their contents", bad);

    result_begin("realloc-grow");
    result_add("ops=%ld", steps);
    result_add("restarts=%ld", restarts);
    result_add("time_s=%.6f", t);
    result_add("mops_per_s=%.3f", (double)steps / t / 1e6);
    result_end();
    return 0;
}
