#!/usr/bin/env bash
# Every test: lints, the Rust core's unit tests, and the Python suite against real KVM.
# Fails if a test is skipped for any reason but a missing /dev/kvm, or if pytest ran nothing.
# Tests marked hw_kvm need a KVM with hardware semantics: where this host's KVM is paravirtualized
# (kvm_pvm) or missing, they run inside the nested machine (`kvmkit nested`), with the core
# raw-guest tests (marked standard_kvm) once more.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh

say() { printf '\033[1m[kvmkit]\033[0m %s\n' "$*"; }

say "lint: rustfmt, clippy, ruff, mypy"
cargo fmt --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc -p kvmkit-core --no-deps --quiet
.venv/bin/ruff check python tests benchmarks fuzz
.venv/bin/ruff format --check python tests benchmarks fuzz
.venv/bin/mypy

say "cargo test"
cargo test --workspace --quiet

# pytest, failing when it ran nothing (exit 5) as when a test failed.
pytest_run() {
    local status=0
    "$@" || status=$?
    if [ "$status" -eq 5 ]; then
        echo "kvmkit: pytest collected no tests" >&2
        return 1
    fi
    return "$status"
}

PYTEST=(.venv/bin/python -m pytest --strict-skips -p no:cacheprovider)
kvm=$(.venv/bin/python -c 'from kvmkit.nested import host_kvm; print(host_kvm().value)')
if [ "$kvm" = hardware ]; then
    say "pytest"
    pytest_run "${PYTEST[@]}" tests "$@"
    exit
fi

say "pytest (this host's KVM: $kvm; tests that need hardware semantics run in the nested machine next)"
status=0
pytest_run "${PYTEST[@]}" tests -m "not hw_kvm and not hw_debug" "$@" || status=$?

say "pytest in the nested machine: Linux guests, and the core raw-guest tests again, on standard KVM"
# The nested machine sees this host's files read-only: build the default guest here first.
.venv/bin/python -c 'from kvmkit.images import default_guest; default_guest()'
pytest_run .venv/bin/kvmkit nested --timeout 2400 -- "${PYTEST[@]}" tests -m "(hw_kvm or standard_kvm) and not hw_debug" "$@" || status=$?
exit "$status"
