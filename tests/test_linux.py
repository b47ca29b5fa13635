"""Booting Linux: kernel loading errors, and the milestones the Debian cloud kernel reaches
(banner, exact command line, e820 map, the CPU count it takes from kvmkit's ACPI tables).

On the paravirtualized KVM of some hosts (``/sys/module/kvm_pvm``) an unmodified kernel runs
partly under instruction emulation and stops early, so these tests assert what every host reaches
(banner, exact command line, e820 map) and record how far the boot got.
"""

from __future__ import annotations

import os
import re
import resource
import threading
import time

import kvmkit
import pytest
from kvmkit import ExitReason
from kvmkit.errors import BootError, ConfigError, IoRangeConflictError, KvmkitError, VmStateError
from kvmkit.images import READY_MARKER

pytestmark = pytest.mark.kvm

MEMORY = 256 << 20
# Gets an unmodified kernel past the instructions paravirtualized KVM cannot emulate; harmless
# on hardware KVM.
EMULATOR_SAFE = "clearcpuid=cx16 noxsave"


def linux_vm(cpus: int = 1) -> kvmkit.VM:
    return kvmkit.VM(memory=MEMORY, cpus=cpus, irqchip=True, pit=True)


@pytest.fixture(scope="session")
def guest():
    from kvmkit.images import default_guest

    return default_guest()


def test_text_file_is_not_a_kernel(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a kernel\n" * 100)
    with linux_vm() as vm, pytest.raises(BootError, match="neither a bzImage nor an ELF"):
        vm.boot_linux(text)


def test_truncated_bzimage_is_refused(guest):
    image = guest.kernel.read_bytes()
    with linux_vm() as vm, pytest.raises(BootError, match="truncated"):
        vm.boot_linux(image[: len(image) // 2])


def test_initrd_larger_than_memory_is_refused(guest):
    with linux_vm() as vm, pytest.raises(BootError, match="does not fit"):
        vm.boot_linux(guest.vmlinux, initrd=bytes(MEMORY))


def test_missing_kernel_file_is_a_boot_error(tmp_path):
    with linux_vm() as vm, pytest.raises(BootError, match="cannot read"):
        vm.boot_linux(tmp_path / "nope")


def test_linux_needs_the_irqchip(guest):
    with kvmkit.VM(memory=MEMORY) as vm, pytest.raises(ConfigError, match="irqchip"):
        vm.boot_linux(guest.vmlinux)


def test_cmdline_longer_than_the_kernel_takes_is_refused(guest):
    with linux_vm() as vm, pytest.raises(BootError, match="command line"):
        vm.boot_linux(guest.kernel, cmdline="x" * 4096)


def tiny_bzimage(payload: int = 0x1000) -> bytes:
    """A bzImage that loads (a 64-bit boot protocol 2.15 header, four setup sectors) but whose
    kernel is all zeros: enough to set a VM up for Linux without booting anything."""
    setup_sects = 4
    image = bytearray((setup_sects + 1) * 512 + payload)
    image[0x1F1] = setup_sects
    image[0x1F4:0x1F8] = (payload // 16).to_bytes(4, "little")  # syssize, in 16-byte units
    image[0x1FE:0x200] = (0xAA55).to_bytes(2, "little")
    image[0x202:0x206] = b"HdrS"
    image[0x206:0x208] = (0x020F).to_bytes(2, "little")  # boot protocol version
    image[0x211] = 0x1  # loadflags: LOADED_HIGH
    image[0x214:0x218] = (0x10_0000).to_bytes(4, "little")  # code32_start
    image[0x22C:0x230] = (0x7FFF_FFFF).to_bytes(4, "little")  # initrd_addr_max
    image[0x236:0x238] = (0x1).to_bytes(2, "little")  # xloadflags: XLF_KERNEL_64
    image[0x238:0x23C] = (2047).to_bytes(4, "little")  # cmdline_size
    return bytes(image)


def test_tiny_bzimage_sets_the_vm_up():
    with linux_vm() as vm:
        vm.boot_linux(tiny_bzimage())
        assert vm.console.read() == b""


@pytest.mark.parametrize("path", ["/dev/zero", "/dev/null", "/"])
def test_kernel_that_is_not_a_regular_file_is_refused(path):
    with linux_vm() as vm, pytest.raises(BootError, match="not a regular file"):
        vm.boot_linux(path)


@pytest.mark.watchdog(30)
def test_fifo_kernel_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "kernel"
    os.mkfifo(fifo)
    with linux_vm() as vm, pytest.raises(BootError, match="not a regular file"):
        vm.boot_linux(fifo, initrd=fifo)


def test_kernel_larger_than_guest_memory_is_refused_before_reading(tmp_path):
    big = tmp_path / "vmlinux"
    with open(big, "wb") as f:  # sparse: a GiB of length costs no disk
        f.write(tiny_bzimage()[:0x1000])
        f.truncate(1 << 30)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    with linux_vm() as vm, pytest.raises(BootError, match="more than the 268435456 bytes of guest memory"):
        vm.boot_linux(big)
    assert time.monotonic() - started < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 << 10  # KiB


@pytest.mark.parametrize("cause", ["corrupt-kernel", "port-taken", "mmio-taken"])
def test_failed_boot_setup_leaves_nothing_behind(cause):
    kernel = tiny_bzimage()
    with linux_vm() as vm:
        if cause == "port-taken":
            vm.hook_io(0x70, read=lambda addr, size: 0)  # the CMOS ports, mapped after COM1
        elif cause == "mmio-taken":
            vm.hook_mmio(0xD000_0000, 0x1000, read=lambda addr, size: 0)  # the boot timer, mapped last
        with pytest.raises(ConfigError):  # BootError for the kernel, IoRangeConflictError for the rest
            vm.boot_linux(kernel[: len(kernel) // 2] if cause == "corrupt-kernel" else kernel)
        with pytest.raises(VmStateError):
            vm.console  # noqa: B018 -- no console came of it
        if cause == "port-taken":
            vm.unhook_io(0x70)
        elif cause == "mmio-taken":
            vm.unhook_mmio(0xD000_0000)

        vm.boot_linux(kernel)

        assert vm.console.read() == b""
        with pytest.raises(IoRangeConflictError):  # now the platform is there, once
            vm.boot_linux(kernel)


def expected_e820(memory: int) -> list[tuple[int, int]]:
    """The usable ranges kvmkit reports for one low RAM region of ``memory`` bytes."""
    return [(0, 0x9FBFF), (0x100000, memory - 1)]


@pytest.mark.watchdog(600)
@pytest.mark.parametrize(
    "image",
    [
        "vmlinux",
        # Paravirtualized KVM emulates a bzImage's decompression instruction by instruction (about
        # four minutes), so this one runs where the hardware-semantics tests do.
        pytest.param("kernel", marks=pytest.mark.hw_kvm),
    ],
    ids=["vmlinux-pvh", "bzImage"],
)
def test_kernel_reaches_its_early_milestones(guest, image, record_property):
    cmdline = f"{kvmkit.vm.DEFAULT_CMDLINE} {EMULATOR_SAFE} earlyprintk=ttyS0"
    timeout = 300 if image == "kernel" else 120
    with linux_vm(cpus=2) as vm:
        console = vm.boot_linux(getattr(guest, image), initrd=guest.initrd, cmdline=cmdline)
        vm.start()
        banner = console.expect(rb"Linux version (\S+) ", timeout=timeout)
        assert banner.group(1).decode() == guest.kernel_version
        console.expect(b"Command line: " + re.escape(cmdline.encode()) + rb"\r?\n", timeout=60)
        ranges = []
        for _ in expected_e820(MEMORY):
            usable = console.expect(rb"BIOS-e820: \[mem 0x([0-9a-f]+)-0x([0-9a-f]+)\] usable", timeout=60)
            ranges.append((int(usable.group(1), 16), int(usable.group(2), 16)))
        assert ranges == expected_e820(MEMORY)
        cpus = console.expect(rb"smpboot: Allowing (\d+) CPUs", timeout=120)
        assert int(cpus.group(1)) == len(vm.vcpus)
        record_property("furthest_milestone", "CPUs counted")
        vm.stop()
        vm.wait(timeout=30)


ON_PARAVIRTUAL_KVM = os.path.exists("/sys/module/kvm_pvm")


@pytest.mark.watchdog(900)
def test_default_guest_boots_as_far_as_the_host_allows(guest, tmp_path, record_property):
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(8 << 20))
    with linux_vm(cpus=2) as vm:
        disk = vm.add_disk(image, serial="kvmkit-test-disk")
        rng = vm.add_rng()
        vsock = vm.add_vsock(3, tmp_path / "vsock.sock")
        console = vm.boot_linux(
            guest.vmlinux, initrd=guest.initrd, cmdline=f"{guest.cmdline} {EMULATOR_SAFE}"
        )
        vm.start()
        if ON_PARAVIRTUAL_KVM:
            # The instruction emulator gives up on the int3 of the kernel's alternatives self-test.
            exit_ = vm.wait(timeout=600)
            assert exit_.reason is ExitReason.INTERNAL_ERROR, exit_
            assert exit_.details["instruction"].startswith(b"\xcc"), exit_  # int3
            assert b"smpboot: Allowing 2 CPUs" in console.output
            # The boot code announced both virtio devices to the kernel.
            for device in (disk, rng, vsock):
                entry = f"virtio_mmio.device=4K@{device.address:#x}:{device.irq}"
                assert entry.encode() in console.output
            record_property("furthest_milestone", "int3 self-test (emulation failure)")
            return
        # On hardware KVM: test_linux_guest.py checks the shell and the devices in detail.
        console.expect(READY_MARKER.encode(), timeout=300)
        console.sendline("echo hello-$((6 * 7))")
        console.expect(b"hello-42", timeout=30)
        console.sendline("exit")
        assert vm.wait(timeout=60).reason is ExitReason.RESET
        record_property("furthest_milestone", "shell, then reset")


# 64-bit code for the tiny kernel's entry: "ok\n" to COM1, then hlt.
SAY_OK = bytes([0x66, 0xBA, 0xF8, 0x03]) + b"".join(bytes([0xB0, c, 0xEE]) for c in b"ok\n") + b"\xf4"
TINY_ENTRY = 0x10_0200  # code32_start + 0x200, the 64-bit entry


@pytest.mark.parametrize("timeout", [1e19, float("inf")])
def test_console_waits_with_huge_timeouts(timeout):
    with linux_vm() as vm:
        console = vm.boot_linux(tiny_bzimage())
        result: list[bytes] = []
        reader = threading.Thread(target=lambda: result.append(console.read(timeout)))
        reader.start()
        reader.join(0.3)
        assert reader.is_alive() and result == []  # waiting, not failed

        vm.mem_write(TINY_ENTRY, SAY_OK)
        vm.run(timeout=1)  # the in-kernel irqchip keeps a halted vCPU waiting: the run times out
        reader.join(10)
        assert result == [b"ok\n"]


@pytest.mark.parametrize("timeout", [-1.0, float("nan")])
def test_console_refuses_impossible_timeouts(timeout):
    with linux_vm() as vm:
        console = vm.boot_linux(tiny_bzimage())
        with pytest.raises(ConfigError):
            console.read(timeout)
        with pytest.raises(KvmkitError):
            console.expect(b"never", timeout)
