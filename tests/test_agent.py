"""The guest agent in the default Linux guest, over vsock: ``VM.exec``, ``put_file`` and
``get_file`` against a booted guest.

They need a KVM that runs Linux to user space (hardware KVM, or ``kvmkit nested``). One guest
serves every test (a boot costs about 20 s in the nested machine); the first test calls exec
right after the start, so it also proves that the client waits for the agent to come up.
``tests/test_agent_protocol.py`` covers the agent and its client without a VM.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time
from collections.abc import Iterator

import kvmkit
import pytest
from kvmkit import ExecResult
from kvmkit.errors import AgentTimeout, CommandFailed, GuestOSError
from kvmkit.images import READY_MARKER, GuestImage

pytestmark = [pytest.mark.hw_kvm, pytest.mark.watchdog(900)]

MEMORY = 256 << 20
BOOT_TIMEOUT = 300  # seconds until the agent answers; about 20 in the nested machine
GUEST_CID = 3


@pytest.fixture(scope="module")
def guest() -> GuestImage:
    from kvmkit.images import default_guest

    return default_guest()


@pytest.fixture(scope="module")
def vm(guest, tmp_path_factory) -> Iterator[kvmkit.VM]:
    """The default guest with a vsock device, started (and not waited for)."""
    work = tmp_path_factory.mktemp("agent")
    with kvmkit.VM(memory=MEMORY, cpus=1, irqchip=True, pit=True) as vm:
        vm.add_vsock(GUEST_CID, work / "v.sock")
        vm.boot_linux(guest.vmlinux, initrd=guest.initrd, cmdline=guest.cmdline)
        vm.start()
        yield vm


def test_exec_right_after_start_waits_for_the_agent_and_matches_the_console(vm):
    uname = vm.exec("uname -a", timeout=BOOT_TIMEOUT)
    assert uname.status == 0 and uname.stderr == b""
    vm.console.expect(READY_MARKER.encode(), timeout=BOOT_TIMEOUT)
    vm.console.sendline("uname -a")
    shown = vm.console.expect(rb"\n(Linux [^\r\n]*)\r?\n", timeout=60).group(1)
    assert uname.stdout == shown + b"\n"


def test_stdout_stderr_and_status_are_separate(vm):
    assert vm.exec("echo out; echo err >&2; exit 7") == ExecResult(b"out\n", b"err\n", 7)
    assert vm.exec("kill -TERM $$").status == -15


def test_stdin_is_passed(vm):
    assert vm.exec(["cat"], input=b"to the guest\n").stdout == b"to the guest\n"
    data = os.urandom(300_000)
    assert vm.exec("md5sum", input=data).stdout.split()[0].decode() == hashlib.md5(data).hexdigest()


def test_a_shell_string_and_an_argv(vm):
    assert vm.exec("echo $((6 * 7)) | tr 4 x").stdout == b"x2\n"
    assert vm.exec(["echo", "$((6 * 7))", "|", "tr"]).stdout == b"$((6 * 7)) | tr\n"
    with pytest.raises(GuestOSError, match="cannot run no-such-program") as caught:
        vm.exec(["no-such-program"])
    assert caught.value.errno == errno.ENOENT


def test_a_command_that_times_out_is_killed_and_the_next_exec_works(vm):
    started = time.monotonic()
    with pytest.raises(AgentTimeout) as caught:
        vm.exec("echo started; sleep 600", timeout=3)
    assert time.monotonic() - started < 3 + 15
    assert caught.value.stdout == b"started\n"
    assert vm.exec("echo next").stdout == b"next\n"
    processes = vm.exec(["ps"]).stdout
    assert b"sleep 600" not in processes, processes.decode()


def test_a_hung_command_does_not_block_the_next(vm):
    results: list[ExecResult] = []
    slow = threading.Thread(target=lambda: results.append(vm.exec("sleep 1000; echo woke", timeout=300)))
    slow.start()
    try:
        assert vm.exec("echo quick", timeout=60).stdout == b"quick\n"
        assert slow.is_alive()
    finally:
        # The slow command may not have reached its sleep yet.
        vm.exec("until killall sleep 2>/dev/null; do usleep 100000; done", timeout=60, check=True)
        slow.join(timeout=60)
    [woken] = results
    assert (woken.stdout, woken.status) == (b"woke\n", 0)  # the shell reports the killed sleep on stderr


def test_check_raises_command_failed(vm):
    with pytest.raises(CommandFailed, match="exited with status 3: nope") as caught:
        vm.exec("echo nope >&2; exit 3", check=True)
    assert caught.value.result == ExecResult(b"", b"nope\n", 3)


def test_put_and_get_file_round_trip_binary_data(vm):
    data = os.urandom(1 << 20)
    vm.put_file("/tmp/blob", data, mode=0o600)
    assert vm.get_file("/tmp/blob") == data
    assert vm.exec("stat -c %a /tmp/blob").stdout == b"600\n"
    assert vm.exec("md5sum /tmp/blob").stdout.split()[0].decode() == hashlib.md5(data).hexdigest()


def test_a_missing_file_is_a_guest_os_error(vm):
    with pytest.raises(GuestOSError, match="cannot open /no/such/file: No such file") as caught:
        vm.get_file("/no/such/file")
    assert caught.value.errno == errno.ENOENT
    with pytest.raises(GuestOSError) as caught:
        vm.put_file("/no/such/dir/file", b"data")
    assert caught.value.errno == errno.ENOENT
    assert vm.get_file("/proc/version").startswith(b"Linux version ")
