#!/bin/sh
# Run by the preload_shell test with LD_PRELOAD=liblgmalloc.so: a pipeline of system
# programs, each one under lgmalloc. Every stage writes a file, so no exit status is lost
# in a pipe; the script stops at the first command that fails or prints the wrong thing.
set -u
d=$(mktemp -d) || exit 10
trap 'rm -rf "$d"' EXIT
ls -la / >"$d/ls" || { echo "ls failed ($?)" >&2; exit 11; }
sort "$d/ls" >"$d/sorted" || { echo "sort failed ($?)" >&2; exit 12; }
head -n 3 "$d/sorted" >"$d/head" || { echo "head failed ($?)" >&2; exit 13; }
n=$(wc -l <"$d/head") || { echo "wc failed ($?)" >&2; exit 14; }
[ "$n" -eq 3 ] || { echo "head printed $n lines, not 3" >&2; exit 15; }
grep -q ' usr$' "$d/ls" || { echo "ls -la / does not list usr" >&2; exit 16; }
sort -c "$d/sorted" || { echo "sort's output is not sorted" >&2; exit 17; }
cat "$d/head" || exit 18
echo done
