#!/usr/bin/env bash
# Every test: lints, the Rust core's unit tests, and the Python suite against real KVM.
# Fails if a test is skipped for any reason but a missing /dev/kvm, or if pytest ran nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh

say() { printf '\033[1m[kvmkit]\033[0m %s\n' "$*"; }

say "lint: rustfmt, clippy, ruff, mypy"
cargo fmt --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc -p kvmkit-core --no-deps --quiet
.venv/bin/ruff check python tests benchmarks
.venv/bin/ruff format --check python tests benchmarks
.venv/bin/mypy

say "cargo test"
cargo test --workspace --quiet

say "pytest"
status=0
.venv/bin/python -m pytest tests --strict-skips "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "kvmkit: pytest collected no tests" >&2
    exit 1
fi
exit "$status"
