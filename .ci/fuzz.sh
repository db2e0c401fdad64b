#!/usr/bin/env bash
# Fuzz every cargo-fuzz target in fuzz/ for a bounded time (FORELOCK_FUZZ_SECS,
# default 20 s each), starting from the committed seeds (fuzz/corpus/<target>/),
# after replaying the committed crash inputs (fuzz/regressions/<target>/).
# Every target runs; a crash in any fails the step at the end, and libFuzzer
# names the input (fuzz/artifacts/<target>/crash-...).
#
# Toolchain: built with `--sanitizer none`, which needs no nightly flags: tested
# with stable (1.9x) and cargo-fuzz 0.13, with and without RUSTC_BOOTSTRAP. So a
# machine with only stable runs this as is. Out-of-bounds checks then come from
# the targets' own guard pages and assertions (see fuzz/README.md); for
# AddressSanitizer run `cargo +nightly fuzz run <target>` by hand.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${FORELOCK_FUZZ_SECS:-20}"

if ! command -v cargo-fuzz >/dev/null; then
    cargo install cargo-fuzz --locked
fi

# fuzz/ is its own workspace with its own target dir (the root one would be
# rebuilt with coverage flags otherwise).
export CARGO_TARGET_DIR="$PWD/target"
cargo fuzz build --sanitizer none

failed=()
for target in $(cargo fuzz list); do
    # Known crashes first: each must no longer crash.
    if [ -d "regressions/$target" ]; then
        for input in "regressions/$target"/*; do
            echo "fuzz: $target: replaying $input"
            if ! cargo fuzz run --sanitizer none "$target" "$input" -- -runs=1; then
                failed+=("$target: still crashes on $input")
            fi
        done
    fi
    # libFuzzer adds what it finds to the first directory: a scratch copy
    # (git-ignored), so the committed seeds stay as they are.
    mkdir -p "corpus-run/$target"
    seeds=()
    if [ -d "corpus/$target" ]; then
        seeds=("corpus/$target")
    fi
    echo "fuzz: $target: ${secs} s"
    if ! cargo fuzz run --sanitizer none "$target" "corpus-run/$target" "${seeds[@]}" \
        -- -max_total_time="$secs" -print_final_stats=1; then
        failed+=("$target: crashed while fuzzing (input in fuzz/artifacts/$target/)")
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    printf 'fuzz: FAILED: %s\n' "${failed[@]}" >&2
    exit 1
fi
echo "fuzz: every target ran ${secs} s without a crash"
