"""The nested machine (``kvmkit nested``): a command runs on a KVM with hardware semantics with the
host's files, its status and output come back, writable shares reach the host, and each way it
can fail raises its own error. Needs no /dev/kvm on the host: the machine is QEMU's emulator."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
from kvmkit import nested
from kvmkit.errors import KvmkitError, NestedError, NestedTimeout

pytestmark = pytest.mark.watchdog(600)


@pytest.fixture(scope="module")
def machine() -> nested.NestedImage:
    return nested.prepare()


def test_a_command_runs_on_standard_kvm_with_the_hosts_files(machine, tmp_path, monkeypatch):
    results = tmp_path / "results"
    results.mkdir()
    (tmp_path / "from-host.txt").write_text("written on the host\n")
    script = (
        "cat from-host.txt; "
        "test -c /dev/kvm && echo kvm=yes; "
        "test -e /sys/module/kvm_amd && test ! -e /sys/module/kvm_pvm && echo kvm_amd=yes; "
        'echo "$KVMKIT_NESTED $KVMKIT_TEST_VALUE" > results/env.txt; '
        "echo lost > not-shared.txt; "
        "echo to-stderr >&2; exit 7"
    )
    monkeypatch.chdir(tmp_path)
    output = io.BytesIO()
    status = nested.run(
        ["sh", "-c", script],
        env=dict(os.environ, KVMKIT_TEST_VALUE="it's passed"),
        writable=[results],
        output=output,
        timeout=300,
    )
    assert status == 7
    lines = output.getvalue().decode().splitlines()
    assert lines == ["written on the host", "kvm=yes", "kvm_amd=yes", "to-stderr"]
    assert (results / "env.txt").read_text() == "1 it's passed\n"
    assert not (tmp_path / "not-shared.txt").exists(), "only writable shares reach the host"


def test_a_missing_program_exits_127_and_a_slow_one_times_out(machine, tmp_path):
    output = io.BytesIO()
    assert nested.run(["kvmkit-no-such-program"], cwd=tmp_path, output=output, timeout=300) == 127
    assert b"not found" in output.getvalue()
    with pytest.raises(NestedTimeout, match="did not end within 20 s") as caught:
        command = ["sh", "-c", "echo about-to-sleep; sleep 600"]
        nested.run(command, cwd=tmp_path, output=io.BytesIO(), timeout=20)
    # What the machine's CPU was doing when it was stopped, and the command's last words, for a
    # hang that shows nothing else.
    assert str(caught.value).count("RIP=") == 2, caught.value
    assert str(caught.value).endswith("the command's last output:\nabout-to-sleep"), caught.value


def test_the_command_line_exits_with_the_commands_status(machine, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "kvmkit", "nested", "--", "sh", "-c", "echo from-inside; exit 3"],
        cwd=tmp_path,
        capture_output=True,
        timeout=300,
    )
    assert (done.returncode, done.stdout) == (3, b"from-inside\n"), done.stderr


def test_without_qemu_the_error_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(NestedError, match="qemu-system-x86_64 is not installed"):
        nested.run(["true"])


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"command": []}, "no command"),
        ({"command": ["true"], "cpus": 0}, "at least one CPU"),
        ({"command": ["true"], "writable": ["/nonexistent/kvmkit"]}, "existing folder"),
        ({"command": ["true"], "memory": "lots"}, "size"),
    ],
)
def test_bad_arguments_are_refused_before_anything_starts(arguments, message):
    with pytest.raises(KvmkitError, match=message):
        nested.run(**arguments)


def test_a_machine_that_cannot_run_the_command_says_why(tmp_path):
    exchange = tmp_path / "exchange"
    exchange.mkdir()
    (exchange / "error").write_text("cannot load the kernel modules: kvm_amd\n")
    with pytest.raises(
        NestedError, match="could not run the command: cannot load the kernel modules: kvm_amd"
    ):
        nested.check_status(exchange, b"")
    (exchange / "error").unlink()
    with pytest.raises(
        NestedError, match="stopped before the command ended; its console:\nbooting\nKernel panic"
    ):
        nested.check_status(exchange, b"booting\nKernel panic - not syncing\n")
