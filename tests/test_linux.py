"""Booting Linux: kernel loading errors, and the milestones the Debian cloud kernel reaches
(banner, exact command line, e820 map, the CPU count it takes from kvmkit's ACPI tables).

On the paravirtualized KVM of some hosts (``/sys/module/kvm_pvm``) an unmodified kernel runs
partly under instruction emulation and stops early, so these tests assert what every host reaches
(banner, exact command line, e820 map) and record how far the boot got.
"""

from __future__ import annotations

import os
import re

import kvmkit
import pytest
from kvmkit import ExitReason
from kvmkit.errors import BootError, ConfigError
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
