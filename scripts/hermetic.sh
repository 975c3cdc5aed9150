# Sourced by scripts/test-all and scripts/reliability: keeps a test run off the user's
# lgmalloc cache and checks that it leaves no process behind.
#
#   hermetic_begin   a fresh run directory; LGMALLOC_CACHE_DIR points into it for every
#                    program that cannot choose its own (the Rust test binaries link
#                    lgmalloc and plan themselves before main); LGMALLOC_TEST_RUN_DIR
#                    marks every process the run starts (children inherit it)
#   hermetic_end     waits (at most HERMETIC_WAIT_SECS, 120) for the processes the run
#                    started (the detached children that run deferred analyses after a
#                    program exits), then fails if any is still running, if a process
#                    still has a liblgmalloc of this tree loaded, or if the run created
#                    the user's cache directory (~/.cache/lgmalloc); removes the run
#                    directory
#   hermetic_cleanup the EXIT trap: waits as hermetic_end does (quietly), then removes
#                    the run directory, so a run that fails midway neither removes it
#                    under a deferred analysis still writing into it nor leaves that
#                    child running
#
# The tests that run programs under lgmalloc give each one a fresh cache directory of
# its own (rust-tests/preload.rs, c-tests/CMakeLists.txt); this is the net under them.

hermetic_root=$(pwd)

hermetic_begin() {
    LGMALLOC_TEST_RUN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/lgmalloc-test-run.XXXXXX") || {
        echo "hermetic: cannot make a temporary directory" >&2
        return 1
    }
    export LGMALLOC_TEST_RUN_DIR
    export LGMALLOC_CACHE_DIR="$LGMALLOC_TEST_RUN_DIR/cache"
    hermetic_user_caches=("$HOME/.cache/lgmalloc")
    [ -n "${XDG_CACHE_HOME:-}" ] && hermetic_user_caches+=("$XDG_CACHE_HOME/lgmalloc")
    hermetic_existed=()
    local c
    for c in "${hermetic_user_caches[@]}"; do
        if [ -e "$c" ]; then hermetic_existed+=(1); else hermetic_existed+=(0); fi
    done
}

# Prints "pid: command line" for each live process of this run (by the environment
# marker, read with shell builtins so that the scan does not find itself) and each
# process that has a liblgmalloc from this tree mapped.
hermetic_leftovers() {
    local f pid v k state ours mapped
    mapped=" $(grep -l -e "$hermetic_root/.*liblgmalloc[^/]*\.so" /proc/[0-9]*/maps 2>/dev/null | tr '\n' ' ') "
    for f in /proc/[0-9]*; do
        pid=${f#/proc/}
        [ "$pid" = "$$" ] && continue
        state=""
        {
            while read -r k v _; do
                if [ "$k" = State: ]; then
                    state=$v
                    break
                fi
            done <"$f/status"
        } 2>/dev/null
        if [ -z "$state" ] || [ "$state" = Z ]; then continue; fi
        ours=0
        {
            while IFS= read -r -d '' v; do
                if [ "$v" = "LGMALLOC_TEST_RUN_DIR=$LGMALLOC_TEST_RUN_DIR" ]; then
                    ours=1
                    break
                fi
            done <"$f/environ"
        } 2>/dev/null
        [[ $mapped == *" $f/maps "* ]] && ours=1
        if [ $ours = 1 ]; then
            echo "$pid: $({ tr '\0' ' ' <"$f/cmdline"; } 2>/dev/null)"
        fi
    done
    return 0
}

hermetic_end() {
    local deadline=$((SECONDS + ${HERMETIC_WAIT_SECS:-120})) left ok=0 i
    left=$(hermetic_leftovers)
    while [ -n "$left" ] && [ $SECONDS -lt $deadline ]; do
        sleep 0.2
        left=$(hermetic_leftovers)
    done
    if [ -n "$left" ]; then
        echo "FAIL: processes started by this test run still run after ${HERMETIC_WAIT_SECS:-120} s:" >&2
        echo "$left" >&2
        ok=1
    fi
    for i in "${!hermetic_user_caches[@]}"; do
        if [ "${hermetic_existed[$i]}" = 0 ] && [ -e "${hermetic_user_caches[$i]}" ]; then
            echo "FAIL: the test run created ${hermetic_user_caches[$i]} (a test ran lgmalloc without LGMALLOC_CACHE_DIR)" >&2
            ok=1
        fi
    done
    rm -rf "$LGMALLOC_TEST_RUN_DIR"
    return $ok
}

hermetic_cleanup() {
    local deadline=$((SECONDS + ${HERMETIC_WAIT_SECS:-120}))
    while [ -n "$(hermetic_leftovers)" ] && [ $SECONDS -lt $deadline ]; do
        sleep 0.2
    done
    rm -rf "$LGMALLOC_TEST_RUN_DIR"
}
