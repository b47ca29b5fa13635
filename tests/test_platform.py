"""kvmkit's Linux platform driven by a small kernel-like guest instead of Linux: the PVH boot
path (start info, command line, memory map, initrd), the COM1 console both ways, the boot timer,
the CMOS RTC, reset through the i8042 and power-off through the ACPI sleep control register."""

from __future__ import annotations

import subprocess
import sys
import time

import kvmkit
import pexpect
import pytest
from kvmkit import ExitReason

pytestmark = pytest.mark.kvm


@pytest.fixture
def platform_vm(make_vm, assemble):
    """A VM with the platform guest loaded as its kernel, and its console."""
    vm = make_vm(memory="64M", irqchip=True, pit=True)
    console = vm.boot_linux(assemble("pvh_platform", elf=True), initrd=b"\x5a" * 4096, cmdline="hello guest")
    return vm, console


def test_guest_sees_the_boot_information_and_the_console_works_both_ways(platform_vm):
    vm, console = platform_vm
    vm.start()

    console.expect(b"cmdline=hello guest memmap=2 modules=1\n", timeout=10)
    console.write("echo me!")
    console.expect(b"echo me", timeout=10)
    exit_ = vm.wait(timeout=10)

    assert exit_.reason is ExitReason.RESET, exit_  # the guest's i8042 reset, after its CMOS check
    assert exit_.vcpu == 0
    assert vm.boot_time is not None and 0 < vm.boot_time < 10


def test_guest_powers_off_through_the_acpi_sleep_control_register(platform_vm):
    vm, console = platform_vm
    vm.start()
    console.expect(b"modules=1\n", timeout=10)
    console.write("bye.")  # '.' makes the guest write S5 to port 0x3c0, as Linux's poweroff does
    console.expect(b"bye", timeout=10)
    exit_ = vm.wait(timeout=10)

    assert exit_.reason is ExitReason.POWEROFF, exit_
    assert exit_.reason.value == "poweroff"
    assert exit_.vcpu == 0


def test_console_log_file_gets_the_output(platform_vm, tmp_path):
    vm, console = platform_vm
    log = tmp_path / "console.log"
    console.log_to(log)
    vm.start()
    console.expect(b"modules=1\n", timeout=10)
    console.write(b"!")
    assert vm.wait(timeout=10).reason is ExitReason.RESET
    assert log.read_bytes() == console.output == b"cmdline=hello guest memmap=2 modules=1\n"


def test_expect_times_out_with_the_tail_of_the_output(platform_vm):
    vm, console = platform_vm
    vm.start()
    with pytest.raises(kvmkit.errors.ConsoleTimeout, match=r"(?s)never shown.*modules=1"):
        console.expect(b"never shown", timeout=0.5)
    assert vm.running  # still waiting for console input
    vm.stop()


@pytest.mark.parametrize(("last_key", "ending"), [("!", "reset"), (".", "poweroff")])
def test_kvmkit_run_boots_a_kernel_with_the_console_on_stdio(
    assemble, tmp_path, kvm_available, last_key, ending
):
    kernel = tmp_path / "kernel.elf"
    kernel.write_bytes(assemble("pvh_platform", elf=True))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvmkit",
            "run",
            "--kernel",
            kernel,
            "--cmdline",
            "from the cli",
            "--memory",
            "64M",
        ],
        input=b"typed" + last_key.encode(),
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr  # a guest that resets or powers off ends cleanly
    assert done.stdout == b"cmdline=from the cli memmap=2 modules=0\ntyped"
    assert f"guest stopped: {ending}".encode() in done.stderr


def kvmkit_run(kernel, *options, stdin=b"!"):
    command = [sys.executable, "-m", "kvmkit", "run", "--kernel", kernel, "--memory", "64M", *options]
    return subprocess.run(command, input=stdin, capture_output=True, timeout=60)


@pytest.mark.parametrize(
    ("options", "cmdline"),
    [
        (["--append", "quiet"], kvmkit.vm.DEFAULT_CMDLINE + " quiet"),
        (["--cmdline", "mine", "--append", "a=1", "--append", "b"], "mine a=1 b"),
    ],
)
def test_kvmkit_run_appends_to_the_command_line(assemble, tmp_path, kvm_available, options, cmdline):
    kernel = tmp_path / "kernel.elf"
    kernel.write_bytes(assemble("pvh_platform", elf=True))
    done = kvmkit_run(kernel, *options)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"cmdline={cmdline} memmap=2 modules=0\n".encode()


def test_kvmkit_run_attaches_virtio_devices(assemble, tmp_path, kvm_available):
    kernel = tmp_path / "kernel.elf"
    kernel.write_bytes(assemble("pvh_platform", elf=True))
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    socket_path = tmp_path / "vsock.sock"
    done = kvmkit_run(
        kernel, "--cmdline", "cli", "--disk", f"{disk},ro", "--rng", "--vsock", f"3,path={socket_path}"
    )
    assert done.returncode == 0, done.stderr
    # The guest prints the command line it was given: the boot code appended one entry per device.
    devices = " ".join(f"virtio_mmio.device=4K@{0xD0100000 + i * 0x1000:#x}:{5 + i}" for i in range(3))
    assert done.stdout == f"cmdline=cli {devices} memmap=2 modules=0\n".encode()
    assert not socket_path.exists(), "the vsock socket is removed when the VM goes"


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--disk", "{tmp}/odd.img"], b"multiple of 512"),
        (["--disk", "{tmp}/odd.img,rw"], b"unknown --disk option 'rw'"),
        (["--vsock", "3"], b"--vsock takes CID,path=SOCKET"),
        (["--vsock", "2,path={tmp}/v.sock"], b"guest CID 2 is reserved"),
        (["--net", "bad/name"], b"invalid tap name"),
    ],
)
def test_kvmkit_run_rejects_bad_device_options(assemble, tmp_path, kvm_available, option, message):
    kernel = tmp_path / "kernel.elf"
    kernel.write_bytes(assemble("pvh_platform", elf=True))
    (tmp_path / "odd.img").write_bytes(bytes(1000))
    done = kvmkit_run(kernel, *(o.format(tmp=tmp_path) for o in option))
    assert done.returncode == 2, done.stderr
    assert message in done.stderr


def test_pexpect_drives_the_console_through_its_file_descriptor(platform_vm):
    from pexpect import fdpexpect

    vm, console = platform_vm
    child = fdpexpect.fdspawn(console.fileno(), timeout=10)
    vm.start()
    child.expect("memmap=2 modules=1\n")
    child.send("over the fd!")
    child.expect("over the fd")
    assert vm.wait(timeout=10).reason is ExitReason.RESET


def test_the_console_descriptor_reaches_end_of_file_when_the_vm_stops(platform_vm):
    from pexpect import fdpexpect

    vm, console = platform_vm
    child = fdpexpect.fdspawn(console.fileno(), timeout=10)
    vm.start()
    child.expect("modules=1\n")
    child.send("bye.")  # the guest powers off
    started = time.monotonic()
    child.expect(pexpect.EOF)
    assert time.monotonic() - started < 5, "EOF comes when the VM stops, not after the timeout"
    assert child.before == b"bye"
    assert vm.wait(timeout=10).reason is ExitReason.POWEROFF


def test_expect_takes_a_list_with_eof_and_timeout_and_tells_before_and_after(platform_vm):
    from kvmkit.console import EOF, TIMEOUT

    vm, console = platform_vm
    vm.start()
    assert console.expect([b"never", rb"memmap=(\d)", b"cmdline"], timeout=10) == 2, "the earliest match wins"
    assert (console.before, console.after) == (b"", b"cmdline")
    assert console.expect([b"never", rb"memmap=(\d)"], timeout=10) == 1
    assert console.match is not None and console.match.group(1) == b"2"
    assert console.before == b"=hello guest "
    assert console.expect([b"never", TIMEOUT], timeout=0.3) == 1
    assert (console.after, console.match) == (TIMEOUT, None)
    console.write("off.")
    assert console.expect([b"never", EOF, TIMEOUT], timeout=10) == 1
    assert console.after is EOF and b"off" in console.before
    assert vm.wait(timeout=10).reason is ExitReason.POWEROFF


def test_expect_says_how_the_vm_stopped(platform_vm):
    vm, console = platform_vm
    vm.start()
    console.expect(b"modules=1\n", timeout=10)
    console.write("!")  # the guest resets
    with pytest.raises(
        kvmkit.errors.ConsoleTimeout, match=r"the VM stopped \(reset\) before the console showed b'never'"
    ):
        console.expect(b"never", timeout=10)


ECHO_TO_STDOUT = """
import sys, kvmkit
print("before the boot")
with kvmkit.VM(memory="64M", irqchip=True, pit=True) as vm:
    console = vm.boot_linux(sys.argv[1], cmdline="to a file")
    console.log_to(sys.stdout)
    vm.start()
    console.expect(b"modules=0\\n", timeout=10)
    console.write(".")
    print("summary:", vm.wait(timeout=10).reason.name)
"""


def test_console_echo_to_a_redirected_stdout_keeps_the_file_in_order(assemble, tmp_path, kvm_available):
    kernel = tmp_path / "kernel.elf"
    kernel.write_bytes(assemble("pvh_platform", elf=True))
    output = tmp_path / "output.txt"
    with output.open("wb") as stdout:  # a regular file, as with `kvmkit demo > file`
        done = subprocess.run(
            [sys.executable, "-c", ECHO_TO_STDOUT, kernel], stdout=stdout, stderr=subprocess.PIPE, timeout=60
        )
    assert done.returncode == 0, done.stderr
    expected = b"before the boot\ncmdline=to a file memmap=2 modules=0\nsummary: POWEROFF\n"
    assert output.read_bytes() == expected


def test_close_frees_the_platforms_descriptors_at_once(kvm_available, assemble):
    """The console's interrupt eventfd and the rest go with close(), not with garbage collection."""
    import gc
    import os

    kernel = assemble("pvh_platform", elf=True)
    kvmkit.VM(memory="2M").close()  # opens the process-wide KVM handle, which stays
    gc.disable()  # nothing may be left for the collector to free
    try:
        before = len(os.listdir("/proc/self/fd"))
        vm = kvmkit.VM(memory="64M", irqchip=True, pit=True)
        console = vm.boot_linux(kernel, cmdline="hello guest")
        vm.start()
        console.expect(b"cmdline=hello guest", timeout=10)
        vm.close()
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        gc.enable()
