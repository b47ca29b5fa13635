# Entry points; each installs what it needs first (see scripts/bootstrap.sh).
.PHONY: demo test bench fuzz build wheel clean

demo:            ## boot the default Linux guest and run a command in it
	scripts/bootstrap.sh
	.venv/bin/kvmkit demo

test:            ## lints, cargo test, pytest
	scripts/test.sh

bench:           ## exit latency, VM churn, snapshots, function calls, debugging, asyncio, soak, boot time and virtio I/O against their baselines
	scripts/bootstrap.sh
	command -v qemu-system-x86_64 >/dev/null || (apt-get update -qq && apt-get install -y -qq qemu-system-x86 >/dev/null)
	.venv/bin/python benchmarks/bench_exits.py
	.venv/bin/python benchmarks/bench_snapshot.py
	.venv/bin/python benchmarks/bench_calls.py
	.venv/bin/python benchmarks/bench_debug.py
	.venv/bin/python benchmarks/bench_asyncio.py
	.venv/bin/python benchmarks/bench_soak.py
	.venv/bin/python benchmarks/bench_boot.py
	.venv/bin/python benchmarks/bench_virtio.py
	.venv/bin/python benchmarks/bench_linux_virtio.py

fuzz:            ## run each fuzz target for FUZZ_SECONDS (default 60)
	scripts/fuzz.sh

build:
	scripts/bootstrap.sh

wheel:           ## the release wheel (stable ABI, manylinux) into dist/; it installs without Rust
	test -x .venv/bin/maturin || scripts/bootstrap.sh
	.venv/bin/maturin build --release --interpreter .venv/bin/python --out dist

clean:
	cargo clean
	rm -rf .venv
