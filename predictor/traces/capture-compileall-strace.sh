#!/bin/sh
# Captures compileall-strace-a.csv.gz: file opens of a byte-compilation
# "build" (python3 -m compileall -j 2) of a copy of the standard library, under strace, converted to the trace format of
# ../shared/traces/README.md (the build-strace-a rules; see
# strace_to_trace.py). Usage: capture-compileall-strace.sh OUT.csv.gz
set -eu
out=${1:?usage: $0 OUT.csv.gz}
here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
stdlib=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
mkdir "$tmp/src"
# The whole standard library but its tests and third-party packages.
for entry in "$stdlib"/*; do
    case $(basename "$entry") in
        site-packages | test | tests | idlelib | config-*) ;;
        *) cp -r "$entry" "$tmp/src/" ;;
    esac
done
find "$tmp/src" -name __pycache__ -prune -exec rm -rf {} +
strace -f -ttt -yy -o "$tmp/strace.log" \
    -e trace=openat,close,close_range,execve,clone,clone3,fork,vfork,exit_group \
    python3 -m compileall -q -j 2 "$tmp/src" >/dev/null 2>&1 ||
    true # a few test-data files in the library do not compile, by design
python3 "$here/strace_to_trace.py" "$tmp/strace.log" "$tmp" | gzip -9n > "$out"
