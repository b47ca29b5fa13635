"""The VM generation id: where the ACPI tables say it is, a new one on each change, and Linux
noticing the change.

The bare-metal test reads the tables and the id straight from guest memory. The Linux tests need
a KVM with hardware semantics (``hw_kvm``): the default guest, whose cloud kernel has no
``vmgenid`` driver, shows that Linux enumerates the devices, reads the id and takes the event
device's interrupt; Debian's generic kernel (the nested machine's), which has the driver built in,
shows that a new id reseeds the guest's random number generator.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import kvmkit
import pytest
from kvmkit.errors import VmStateError
from kvmkit.images import READY_MARKER, GuestImage

MEMORY = 256 << 20
BOOT_TIMEOUT = 300  # seconds to the ready marker
SHELL_TIMEOUT = 60
ACPI_TABLES_ADDR = 0xE0000  # the RSDP, where the guest scans for it
ID_SIZE = 16
RESEEDED = "crng reseeded due to virtual machine fork"  # drivers/char/random.c, at KERN_NOTICE

# --------------------------------------------------------------------------- tables and memory


def aml_integer(data: bytes, at: int) -> tuple[int, int]:
    """The AML integer constant at ``at`` and where the next term starts."""
    if data[at] in (0x00, 0x01):  # ZeroOp, OneOp
        return data[at], at + 1
    size = {0x0A: 1, 0x0B: 2, 0x0C: 4, 0x0E: 8}[data[at]]
    return int.from_bytes(data[at + 1 : at + 1 + size], "little"), at + 1 + size


def dsdt(vm: kvmkit.VM) -> bytes:
    """The DSDT, found as a guest finds it: RSDP -> XSDT -> FADT -> X_DSDT."""
    rsdp = vm.mem_read(ACPI_TABLES_ADDR, 36)
    assert rsdp[:8] == b"RSD PTR "
    (xsdt_addr,) = struct.unpack_from("<Q", rsdp, 24)
    (xsdt_len,) = struct.unpack("<I", vm.mem_read(xsdt_addr + 4, 4))
    entries = vm.mem_read(xsdt_addr + 36, xsdt_len - 36)
    tables = [struct.unpack_from("<Q", entries, i)[0] for i in range(0, len(entries), 8)]
    [fadt] = [addr for addr in tables if vm.mem_read(addr, 4) == b"FACP"]
    (dsdt_addr,) = struct.unpack("<Q", vm.mem_read(fadt + 140, 8))
    (dsdt_len,) = struct.unpack("<I", vm.mem_read(dsdt_addr + 4, 4))
    return vm.mem_read(dsdt_addr, dsdt_len)


def generation_id_address(vm: kvmkit.VM) -> int:
    """The address the generation id's device gives: `Name (ADDR, Package () { low, high })`."""
    table = dsdt(vm)
    assert b"\x08_HID\x0dVMGENCTR\x00" in table and b"\x08_CID\x0dVM_Gen_Counter\x00" in table
    at = table.index(b"\x08ADDR\x12") + 6
    assert table[at + 1] == 2, "two elements"
    low, at = aml_integer(table, at + 2)
    high, _ = aml_integer(table, at)
    return high << 32 | low


@pytest.mark.kvm
def test_the_id_sits_where_the_tables_say_and_changes_on_request(make_vm, assemble):
    vm = make_vm(memory="64M", irqchip=True, pit=True)
    with pytest.raises(VmStateError, match="no Linux kernel"):
        vm._core._change_generation_id()
    vm.boot_linux(assemble("pvh_platform", elf=True), cmdline="hello guest")
    addr = generation_id_address(vm)
    assert addr % 8 == 0 and 0xE0000 <= addr < 0x100000, f"{addr:#x}: 8-byte aligned in the BIOS area"
    seen = [vm.mem_read(addr, ID_SIZE)]
    for _ in range(3):
        vm._core._change_generation_id()
        seen.append(vm.mem_read(addr, ID_SIZE))
    assert len(set(seen)) == len(seen) and bytes(ID_SIZE) not in seen, seen
    vm.close()
    with pytest.raises(VmStateError):
        vm._core._change_generation_id()


# --------------------------------------------------------------------------- Linux guests


@pytest.fixture(scope="module")
def guest() -> GuestImage:
    from kvmkit.images import default_guest

    return default_guest()


@pytest.fixture(scope="module")
def generic_kernel() -> Path:
    """Debian's generic kernel (``linux-image-amd64``, the nested machine's), which has the
    ``vmgenid`` driver built in; the default guest's cloud kernel is built without it."""
    from kvmkit import nested

    return nested.prepare().kernel


def boot(vm: kvmkit.VM, kernel: Path, guest: GuestImage, cmdline: str) -> kvmkit.Console:
    console = vm.boot_linux(kernel, initrd=guest.initrd, cmdline=cmdline)
    vm.start()
    console.expect(READY_MARKER.encode(), timeout=BOOT_TIMEOUT)
    return console


def shell(console: kvmkit.Console, command: str, answer: str) -> re.Match[bytes]:
    """Runs ``command`` and waits for ``answer`` (a regex), which the echoed command line must
    not match itself: commands print through ``$(...)``."""
    console.sendline(command)
    return console.expect(answer.encode(), timeout=SHELL_TIMEOUT)


def guest_id(console: kvmkit.Console, addr: int) -> bytes:
    """The id as the guest reads it through /dev/mem (two 64-bit reads)."""
    words = shell(
        console, f"echo id=$(devmem {addr:#x} 64):$(devmem {addr + 8:#x} 64)", r"id=(\w+):(\w+)\r?\n"
    )
    return b"".join(int(word, 16).to_bytes(8, "little") for word in words.groups())


def ged_interrupts(console: kvmkit.Console) -> int:
    """How often the Generic Event Device's interrupt fired (one vCPU: one column)."""
    command = "echo ged=$(awk '/ACPI:Ged/ {print $2}' /proc/interrupts)"
    return int(shell(console, command, r"ged=(\d+)\r?\n").group(1))


@pytest.mark.hw_kvm
@pytest.mark.watchdog(900)
def test_linux_finds_the_devices_reads_the_id_and_takes_the_event_interrupt(guest):
    with kvmkit.VM(memory=MEMORY, cpus=1, irqchip=True, pit=True) as vm:
        console = boot(vm, guest.vmlinux, guest, guest.cmdline)
        addr = generation_id_address(vm)
        devices = "echo acpi=$(ls /sys/bus/acpi/devices | grep -E 'VMGENCTR|ACPI0013')"
        shell(console, devices, "acpi=ACPI0013:00 VMGENCTR:00")
        shell(console, "echo ged=$(ls /sys/bus/platform/drivers/acpi-ged)", "ged=ACPI0013:00")
        assert guest_id(console, addr) == vm.mem_read(addr, ID_SIZE)
        before = ged_interrupts(console)
        vm._core._change_generation_id()
        assert guest_id(console, addr) == vm.mem_read(addr, ID_SIZE), "the guest reads the new id"
        assert ged_interrupts(console) == before + 1, "one event-device interrupt per change"
        console.sendline("poweroff -f")
        assert vm.wait(timeout=SHELL_TIMEOUT).reason is kvmkit.ExitReason.POWEROFF


@pytest.mark.hw_kvm
@pytest.mark.watchdog(900)
def test_a_new_generation_id_makes_linux_reseed_its_random_generator(guest, generic_kernel):
    with kvmkit.VM(memory=MEMORY, cpus=1, irqchip=True, pit=True) as vm:
        # Quiet: the generic kernel's many boot messages would take long on the serial console.
        console = boot(vm, generic_kernel, guest, f"{guest.cmdline} quiet")
        shell(console, "echo driver=$(ls /sys/bus/acpi/drivers/vmgenid)", r"driver=[^\r\n]*VMGENCTR:00")
        # Linux reseeds (and says so) only once its generator is ready.
        wait_ready = "until dmesg | grep -q 'crng init done'; do sleep 1; done; echo ready=$((1 + 1))"
        shell(console, wait_ready, "ready=2")
        for forks in (1, 2):
            vm._core._change_generation_id()
            count = f"$(dmesg | grep -c '{RESEEDED}')"
            wait = (
                f"for i in $(seq 60); do [ {count} -ge {forks} ] && break; sleep 1; done; echo forks={count}"
            )
            shell(console, wait, f"forks={forks}\r?\n")
        lines = shell(console, f"dmesg | grep '{RESEEDED}'", rf"(\[[ \d.]+\] random: {RESEEDED}\r?\n){{2}}")
        print(lines.group(0).decode())
        console.sendline("poweroff -f")
        assert vm.wait(timeout=SHELL_TIMEOUT).reason is kvmkit.ExitReason.POWEROFF
