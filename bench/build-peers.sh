#!/usr/bin/env bash
# Builds the newest anchors from their own sources, with their own CMake files:
# mimalloc 3.4.3 and snmalloc 0.7.5. Nothing of theirs is kept in this repository; the
# sources come from clones you provide (for example the public repositories
# microsoft/mimalloc and microsoft/snmalloc), from which the tagged version is exported.
#
#   bench/build-peers.sh MIMALLOC_REPO SNMALLOC_REPO
#
# MIMALLOC_REPO / SNMALLOC_REPO: a git repository (a clone or a bare mirror) holding the
# tags v3.4.3 and 0.7.5, or an unpacked source tree of exactly that version. Results:
# bench/build/peers/libmimalloc-3.4.3.so and bench/build/peers/libsnmalloc-0.7.5.so
# (snmalloc's preloadable shim), which `bench/run.py` then lists as `mimalloc3` and
# `snmalloc`, and bench/build/peers/test-stress-3.4.3: mimalloc's own stress test
# (test/test-stress.c of v3.4.3) built with -DUSE_STD_MALLOC, so it calls plain malloc
# and runs under any allocator by LD_PRELOAD (the runner's `test-stress` workload).
# About a minute each on 2 cores. A peer already built is kept (FORCE=1 rebuilds all).
set -euo pipefail
cd "$(dirname "$0")"
[ $# -eq 2 ] || { sed -n '2,13p' "$0"; exit 2; }
out=$PWD/build/peers
mkdir -p "$out"
jobs=${JOBS:-2}

# Copies version $2 of the sources at $1 into directory $3.
export_sources() {
    local src=$1 tag=$2 dest=$3
    rm -rf "$dest"
    mkdir -p "$dest"
    if git --git-dir="$src/.git" rev-parse -q --verify "refs/tags/$tag" >/dev/null 2>&1; then
        git --git-dir="$src/.git" archive "$tag" | tar -x -C "$dest"
    elif git --git-dir="$src" rev-parse -q --verify "refs/tags/$tag" >/dev/null 2>&1; then
        git --git-dir="$src" archive "$tag" | tar -x -C "$dest"
    elif [ -f "$src/CMakeLists.txt" ]; then
        echo "note: $src is no git repository with tag $tag: building the tree as it is" >&2
        cp -a "$src/." "$dest"
    else
        echo "error: $src holds neither tag $tag nor a source tree" >&2
        exit 1
    fi
}

# $1 name, $2 sources, $3 tag, $4 CMake target, $5 the built library's glob, then CMake
# options.
build_peer() {
    local name=$1 src=$2 tag=$3 target=$4 lib=$5
    shift 5
    local work=$PWD/build/peer-src/$name
    echo "== $name $tag"
    if [ -f "$out/lib$name-${tag#v}.so" ] && [ -z "${FORCE:-}" ]; then
        echo "   $out/lib$name-${tag#v}.so (already built; FORCE=1 rebuilds)"
        return
    fi
    export_sources "$src" "$tag" "$work/src"
    cmake -S "$work/src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release "$@" >"$work/configure.log"
    cmake --build "$work/build" -j "$jobs" --target "$target" >"$work/build.log"
    local built
    built=$(find "$work/build" -maxdepth 1 -name "$lib" -type f | sort | head -1)
    [ -n "$built" ] || { echo "error: no $lib in $work/build" >&2; exit 1; }
    cp "$built" "$out/lib$name-${tag#v}.so"
    echo "   $out/lib$name-${tag#v}.so"
}

build_peer mimalloc "$1" v3.4.3 mimalloc 'libmimalloc.so.*' \
    -DMI_BUILD_TESTS=OFF -DMI_BUILD_STATIC=OFF -DMI_BUILD_OBJECT=OFF
build_peer snmalloc "$2" 0.7.5 snmallocshim 'libsnmallocshim.so' \
    -DSNMALLOC_BUILD_TESTING=OFF

# mimalloc's test-stress, from the same tag, as a plain-malloc program (assertions kept).
# $1 the mimalloc sources (as for build_peer).
build_test_stress() {
    local dest=$out/test-stress-3.4.3 work=$PWD/build/peer-src/test-stress
    echo "== test-stress v3.4.3"
    rm -rf "$work"
    mkdir -p "$work"
    if git --git-dir="$1/.git" rev-parse -q --verify refs/tags/v3.4.3 >/dev/null 2>&1; then
        git --git-dir="$1/.git" show v3.4.3:test/test-stress.c >"$work/test-stress.c"
    elif git --git-dir="$1" rev-parse -q --verify refs/tags/v3.4.3 >/dev/null 2>&1; then
        git --git-dir="$1" show v3.4.3:test/test-stress.c >"$work/test-stress.c"
    else
        cp "$1/test/test-stress.c" "$work/test-stress.c"
    fi
    ${CC:-gcc} -O2 -g -DUSE_STD_MALLOC -pthread -o "$dest" "$work/test-stress.c"
    echo "   $dest"
}
build_test_stress "$1"
