#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ for a bounded time (FUZZ_SECONDS each, default 60), installing
# cargo-fuzz first if needed, and reports each target's executions and coverage (edges).
# cargo-fuzz passes unstable compiler flags (sanitizer coverage); RUSTC_BOOTSTRAP lets the stable
# toolchain accept them. Each run starts from the seeds kept in fuzz/corpus/<target> (written by
# fuzz/seeds.py) and writes what it finds to a scratch folder, so the kept seeds stay as they are.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${FUZZ_SECONDS:-60}"
command -v g++ >/dev/null || (apt-get update -qq && apt-get install -y -qq g++ >/dev/null)
cargo fuzz --version >/dev/null 2>&1 || cargo install --locked cargo-fuzz
scratch=$(mktemp -d -t kvmkit-fuzz-XXXXXX)
trap 'rm -rf "$scratch"' EXIT
cd fuzz
summary=()
for target in $(cargo fuzz list); do
    echo "== fuzzing $target for ${seconds}s"
    mkdir -p "$scratch/$target"
    RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" "$scratch/$target" "corpus/$target" -- \
        -max_total_time="$seconds" -print_final_stats=1 2>&1 | tee "$scratch/$target.log"
    # libFuzzer's last status line: "#<executions> DONE cov: <edges> ft: <features> ...".
    done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$scratch/$target.log" | tail -1)
    runs=$(sed -E 's/^#([0-9]+).*/\1/' <<<"$done_line")
    edges=$(sed -E 's/.*cov: ([0-9]+).*/\1/' <<<"$done_line")
    summary+=("$target: $runs executions, $edges edges covered")
done
printf '== %s\n' "${summary[@]}"
