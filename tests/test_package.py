"""The package around the core: the demo and its guest, the CLI, the native module's stubs."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import kvmkit
import pytest

PACKAGE = Path(kvmkit.__file__).parent
ROOT = Path(__file__).parent.parent


def test_bundled_greeting_guest_is_built_from_its_source(tmp_path):
    source = PACKAGE / "guests" / "greeting.S"
    obj, flat = tmp_path / "greeting.o", tmp_path / "greeting.bin"
    subprocess.run(["as", "--64", "-o", obj, source], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", obj, flat], check=True)
    assert (PACKAGE / "guests" / "greeting.bin").read_bytes() == flat.read_bytes()


@pytest.mark.kvm
@pytest.mark.parametrize("name", ["Ada", "Grace Hopper", ""])
def test_demo_guest_answers_the_name_it_is_given(name):
    from kvmkit.demo import run_greeting

    result = run_greeting(name)
    assert result.exit.reason is kvmkit.ExitReason.HLT
    assert result.output == (
        f"Hello, {name}! Your name has {len(name)} letters. "
        "Greetings from a kvmkit guest in 64-bit long mode.\n"
    )
    # One exit per byte written and per name byte read, plus the terminating zero.
    assert result.io_exits == len(result.output) + len(name) + 1


@pytest.mark.kvm
def test_cli_hello_prints_the_greeting_and_succeeds():
    done = subprocess.run(
        [sys.executable, "-m", "kvmkit", "hello", "--name", "CLI"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Hello, CLI! Your name has 3 letters.")
    assert "guest stopped: hlt" in done.stdout


def test_cli_rejects_unknown_commands():
    done = subprocess.run([sys.executable, "-m", "kvmkit", "fly"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "invalid choice: 'fly'" in done.stderr


def test_version_is_the_cargo_workspaces_and_the_extension_is_abi3():
    """One version: Cargo.toml's, which maturin writes into the distribution's metadata and the
    extension reports as ``kvmkit.__version__``."""
    from test_wheel import cargo_version

    assert kvmkit.__version__ == importlib.metadata.version("kvmkit") == cargo_version()
    assert Path(kvmkit._core.__file__).name == "_core.abi3.so"


def test_native_module_matches_its_stubs():
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy.stubtest",
            "kvmkit._core",
            "--allowlist",
            ROOT / "tests/stubtest-allowlist.txt",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_furthest_milestone_is_the_last_one_shown():
    from kvmkit.demo import furthest_milestone

    log = b"[    0.0] Linux version 6.1.0 (x)\r\n[    0.0] Command line: console=ttyS0\r\n"
    assert furthest_milestone(log) == "command line"
    assert furthest_milestone(log + b"[ 9.9] smpboot: Allowing 2 CPUs, 0 hotplug CPUs\r\n") == "CPUs counted"
    assert furthest_milestone(b"garbage") is None
