# Entry points; each installs what it needs first (see scripts/bootstrap.sh).
.PHONY: demo test bench build clean

demo:            ## boot the default Linux guest and run a command in it
	scripts/bootstrap.sh
	.venv/bin/kvmkit demo

test:            ## lints, cargo test, pytest
	scripts/test.sh

bench:           ## exit latency and VM churn against a C baseline
	scripts/bootstrap.sh
	.venv/bin/python benchmarks/bench_exits.py

build:
	scripts/bootstrap.sh

clean:
	cargo clean
	rm -rf .venv
