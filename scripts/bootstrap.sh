#!/usr/bin/env bash
# Installs what building and testing kvmkit needs, then builds the extension into .venv.
# Idempotent: a second run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1m[kvmkit]\033[0m %s\n' "$*"; }

# Debian packages: an assembler and objcopy for the test guests, a C compiler for the
# benchmark baseline and the guest agent, cpio to read initramfs archives back in tests, gdb for
# the gdb server's tests, and venv support for the system Python.
missing=()
command -v as >/dev/null && command -v objcopy >/dev/null || missing+=(binutils)
command -v cc >/dev/null || missing+=(gcc)
# The default guest's agent is linked statically, against glibc's static library.
printf 'int main(void) { return 0; }\n' | cc -static -x c -o /dev/null - 2>/dev/null || missing+=(libc6-dev)
command -v cpio >/dev/null || missing+=(cpio)
command -v gdb >/dev/null || missing+=(gdb)
command -v ip >/dev/null || missing+=(iproute2)
command -v python3 >/dev/null || missing+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
# Without a KVM that can boot Linux guests (none, or paravirtualized), the demo and the Linux tests
# run in the nested machine, which is QEMU's.
if [ ! -w /dev/kvm ] || [ -e /sys/module/kvm_pvm ]; then
    command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
fi
if ((${#missing[@]})); then
    say "installing Debian packages: ${missing[*]}"
    if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null; then
    echo "kvmkit: cargo (Rust 1.85 or newer) is needed to build the extension; install it with rustup" >&2
    exit 1
fi

if [ ! -x .venv/bin/python ]; then
    say "creating .venv"
    python3 -m venv .venv
fi
if ! .venv/bin/python -c 'import maturin, pytest, pytest_timeout, pexpect, ruff, mypy, lz4, zstandard, hypothesis' 2>/dev/null; then
    say "installing build and test tools into .venv"
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q "maturin>=1.9,<2" "pytest>=7" "pytest-timeout>=2.1" "pexpect>=4.8" "ruff>=0.4" "mypy>=1.8" "lz4>=4" "zstandard>=0.22" "hypothesis>=6"
fi

say "building kvmkit (release)"
# The extension is built for the stable ABI (_core.abi3.so); a version-specific one left by an older
# build would be imported first.
rm -f python/kvmkit/_core.cpython-*.so
VIRTUAL_ENV="$PWD/.venv" PATH="$PWD/.venv/bin:$PATH" .venv/bin/maturin develop --release --quiet
