#!/usr/bin/env bash
# Loom model check of the fast path's lock-word transitions (shm-layout),
# in its own target dir so the cfg(loom) build does not invalidate the main one.
set -euo pipefail
cd "$(dirname "$0")/.."
RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
    cargo test -p forelock-shm-layout --release --lib loom_tests
