#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ for a bounded time (FUZZ_SECONDS each, default 60), installing
# cargo-fuzz first if needed. cargo-fuzz passes unstable compiler flags (sanitizer coverage);
# RUSTC_BOOTSTRAP lets the stable toolchain accept them.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${FUZZ_SECONDS:-60}"
command -v g++ >/dev/null || (apt-get update -qq && apt-get install -y -qq g++ >/dev/null)
cargo fuzz --version >/dev/null 2>&1 || cargo install --locked cargo-fuzz
cd fuzz
for target in $(cargo fuzz list); do
    echo "== fuzzing $target for ${seconds}s"
    RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" -- -max_total_time="$seconds"
done
