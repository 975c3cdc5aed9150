#!/usr/bin/env bash
# The cache's disk bound end to end: N distinct programs (each its own build-id, so each
# its own analysis entry, plan and observations) run under LD_PRELOAD with
# LGMALLOC_CACHE_MAX_MB=1; prints the cache's disk usage as du counts it after every
# 50 programs. Usage: bench/cache_bound.sh LIBLGMALLOC_SO [N=300]
set -euo pipefail
lib=$(realpath "$1"); n=${2:-300}
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
cache=$work/cache
for i in $(seq 1 "$n"); do
    printf '#include <stdlib.h>\n#include <string.h>\nint main(void){char *p[64];for(int r=0;r<200;r++){for(int k=0;k<64;k++){p[k]=malloc(%d+k%%3*16);memset(p[k],r,8);}for(int k=0;k<64;k++)free(p[k]);}return 0;}\n' \
        $((16 + i % 200)) >"$work/p.c"
    gcc -O1 -o "$work/p$i" "$work/p.c" -DVARIANT="$i" -Wl,--build-id=sha1 -Wl,-z,norelro -Xlinker --defsym=variant_$i=0
    LGMALLOC_CACHE_DIR=$cache LGMALLOC_CACHE_MAX_MB=1 LGMALLOC_ANALYSIS_BUDGET_MS=1000 \
        LD_PRELOAD=$lib "$work/p$i"
    rm -f "$work/p$i"
    if [ $((i % 50)) -eq 0 ]; then
        echo "after $i programs: $(du -sk "$cache" | cut -f1) KiB on disk, $(ls "$cache" | wc -l) files"
    fi
done
