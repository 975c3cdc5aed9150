/* Which allocator API a workload calls.
 *
 * One source builds three ways:
 *   -DUSE_LG  lgmalloc's lg_* API  (link liblgmalloc.so built without `override`)
 *   -DUSE_MI  mimalloc's mi_* API  (link -lmimalloc)
 *   (none)    the C library's malloc: glibc, or whatever LD_PRELOAD puts in front of it
 */
#ifndef BENCH_ALLOC_API_H
#define BENCH_ALLOC_API_H

#include <stddef.h>
#include <stdlib.h>

#if defined(USE_LG)
#include "lgmalloc.h"
#define B_MALLOC(n) lg_malloc(n)
#define B_FREE(p) lg_free(p)
#define B_REALLOC(p, n) lg_realloc((p), (n))
#define B_API "lg"
#elif defined(USE_MI)
#include <mimalloc.h>
#define B_MALLOC(n) mi_malloc(n)
#define B_FREE(p) mi_free(p)
#define B_REALLOC(p, n) mi_realloc((p), (n))
#define B_API "mi"
#else
#define B_MALLOC(n) malloc(n)
#define B_FREE(p) free(p)
#define B_REALLOC(p, n) realloc((p), (n))
#define B_API "malloc"
#endif

#endif
