"""The default Linux guest to its shell on a KVM with hardware semantics (hardware KVM, or the
nested machine: ``scripts/test.sh`` runs these there when this host's KVM is paravirtualized or
missing): every boot path, both vCPUs online, and the virtio devices driven by Linux's own
drivers from the guest's shell — disks, entropy, network through a tap, vsock — then ``poweroff``
and ``reboot``, and ``kvmkit run`` on a pseudo-terminal.

Boots are what cost here (about 20 s each in the nested machine), so one guest with every device
serves the shell checks, and each boot-path test also ends the guest a different way.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import struct
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import kvmkit
import pexpect
import pytest
from kvmkit import ExitReason
from kvmkit.images import READY_MARKER, GuestImage
from kvmkit.virtio import Disk, Rng, Vsock
from support import GdbRemote, in_netns, ip, network_namespace

pytestmark = [pytest.mark.hw_kvm, pytest.mark.watchdog(900)]

MEMORY = 256 << 20
BOOT_TIMEOUT = 300  # seconds to the ready marker; about 20 in the nested machine
SHELL_TIMEOUT = 60
DISK_SERIAL = "kvmkit-test-disk"
TAP = "ktap0"
HOST_IP, GUEST_IP = "10.0.2.1", "10.0.2.15"
GUEST_CID = 3


@pytest.fixture(scope="module")
def guest() -> GuestImage:
    from kvmkit.images import default_guest

    return default_guest()


def boot(vm: kvmkit.VM, kernel: Path | bytes, guest: GuestImage) -> kvmkit.Console:
    """Boots ``kernel`` with the default guest's initramfs to its shell."""
    console = vm.boot_linux(kernel, initrd=guest.initrd, cmdline=guest.cmdline)
    vm.start()
    console.expect(READY_MARKER.encode(), timeout=BOOT_TIMEOUT)
    return console


def shell(console: kvmkit.Console, command: str, answer: bytes | str) -> re.Match[bytes]:
    """Runs ``command`` in the guest's shell and waits for ``answer`` (a regex) in its output.

    Commands print their answers through ``$(...)`` or arithmetic, so the echo of the command
    line itself never matches.
    """
    console.sendline(command)
    return console.expect(answer.encode() if isinstance(answer, str) else answer, timeout=SHELL_TIMEOUT)


def cpus_online(console: kvmkit.Console) -> int:
    online = shell(console, "echo online=$(cat /sys/devices/system/cpu/online)", rb"online=([0-9,-]+)\r?\n")
    count = 0
    for part in online.group(1).decode().split(","):
        first, _, last = part.partition("-")
        count += int(last or first) - int(first) + 1
    return count


# --------------------------------------------------------------------------- boot paths


def without_pvh_note(vmlinux: bytes) -> bytes:
    """``vmlinux`` with its PVH entry note renamed, so a loader must use the ELF's 64-bit entry."""
    image = bytearray(vmlinux)
    (phoff,) = struct.unpack_from("<Q", image, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", image, 0x36)
    renamed = 0
    for index in range(phnum):
        p_type, _flags, offset, _vaddr, _paddr, size = struct.unpack_from(
            "<IIQQQQ", image, phoff + index * phentsize
        )
        if p_type != 4:  # PT_NOTE
            continue
        position = offset
        while position + 12 <= offset + size:
            namesz, descsz, note_type = struct.unpack_from("<III", image, position)
            name = bytes(image[position + 12 : position + 12 + namesz]).rstrip(b"\0")
            if name == b"Xen" and note_type == 18:  # XEN_ELFNOTE_PHYS32_ENTRY
                struct.pack_into("<I", image, position + 8, 0x4B564D4B)  # a type nobody reads
                renamed += 1
            position += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    assert renamed == 1, "the default guest's vmlinux should carry exactly one PVH note"
    return bytes(image)


@pytest.mark.parametrize(
    ("image", "ending", "reason"),
    [
        ("bzImage", "poweroff -f", ExitReason.POWEROFF),
        ("elf-64-bit-entry", "reboot -f", ExitReason.RESET),
    ],
)
def test_each_boot_path_reaches_the_shell_and_ends_as_the_guest_says(guest, image, ending, reason):
    kernel = guest.kernel if image == "bzImage" else without_pvh_note(guest.vmlinux.read_bytes())
    with kvmkit.VM(memory=MEMORY, cpus=1, irqchip=True, pit=True) as vm:
        console = boot(vm, kernel, guest)
        assert vm.boot_time is not None and vm.boot_time > 0
        shell(console, "echo sum=$((40 + 2))", "sum=42")
        assert cpus_online(console) == 1
        console.sendline(ending)
        assert vm.wait(timeout=SHELL_TIMEOUT).reason is reason


# --------------------------------------------------------------------------- one guest, every device


@dataclass
class Booted:
    vm: kvmkit.VM
    console: kvmkit.Console
    image: Path
    disk: Disk
    readonly_image: Path
    rng: Rng
    vsock: Vsock
    netns: str


@pytest.fixture(scope="module")
def booted(guest, tmp_path_factory) -> Iterator[Booted]:
    """The default guest through PVH on two vCPUs with two disks (one read-only), entropy, a
    network card on a tap in a private network namespace, and vsock."""
    work = tmp_path_factory.mktemp("linux")
    image, readonly_image = work / "disk.img", work / "readonly.img"
    image.write_bytes(os.urandom(8 << 20))
    readonly_image.write_bytes(os.urandom(1 << 20))
    with (
        network_namespace("kvmkit-linux") as netns,
        kvmkit.VM(memory=MEMORY, cpus=2, irqchip=True, pit=True) as vm,
    ):
        disk = vm.add_disk(image, serial=DISK_SERIAL)
        vm.add_disk(readonly_image, read_only=True)
        rng = vm.add_rng()
        vsock = vm.add_vsock(GUEST_CID, work / "vsock.sock")
        in_netns(netns, lambda: vm.add_net(TAP))
        ip(netns, "addr", "add", f"{HOST_IP}/24", "dev", TAP)
        ip(netns, "link", "set", TAP, "up")
        console = boot(vm, guest.vmlinux, guest)
        yield Booted(vm, console, image, disk, readonly_image, rng, vsock, netns)
        console.sendline("exit")  # /init reboots when its shell ends
        assert vm.wait(timeout=SHELL_TIMEOUT).reason is ExitReason.RESET


def test_both_vcpus_come_online(booted):
    assert cpus_online(booted.console) == 2
    shell(booted.console, "echo n=$(nproc)", "n=2")


def test_the_disk_shows_its_size_serial_and_contents(booted):
    console, image = booted.console, booted.image
    shell(console, "echo size=$(cat /sys/block/vda/size)", f"size={image.stat().st_size // 512}\r?\n")
    shell(console, "echo serial=$(cat /sys/block/vda/serial)", f"serial={DISK_SERIAL}")
    sector = image.read_bytes()[7 * 512 : 8 * 512]
    md5 = hashlib.md5(sector).hexdigest()
    shell(console, "echo md5=$(dd if=/dev/vda bs=512 skip=7 count=1 2>/dev/null | md5sum)", f"md5={md5}")


def test_a_guest_write_reaches_the_image_after_sync(booted):
    text = "written-by-the-guest"
    shell(
        booted.console,
        f"printf {text} | dd of=/dev/vda bs=512 seek=9 conv=notrunc,fsync 2>/dev/null; sync; "
        "echo synced=$((1+1))",
        "synced=2",
    )
    with open(booted.image, "rb") as image:
        image.seek(9 * 512)
        assert image.read(len(text)) == text.encode()
    assert booted.disk.stats.bytes_from_guest >= len(text)


def test_a_read_only_disk_refuses_writes(booted):
    console = booted.console
    shell(console, "echo ro=$(cat /sys/block/vdb/ro)", "ro=1")
    before = booted.readonly_image.read_bytes()
    shell(
        console,
        "dd if=/dev/zero of=/dev/vdb bs=512 count=1 conv=fsync 2>/dev/null; echo status=$?",
        "status=1",
    )
    assert booted.readonly_image.read_bytes() == before


def test_entropy_comes_from_the_hwrng(booted):
    before = booted.rng.stats.bytes_to_guest
    shell(booted.console, "echo rng=$(cat /sys/class/misc/hw_random/rng_current)", rb"rng=virtio_rng\.\d+")
    shell(booted.console, "echo got=$(head -c 4096 /dev/hwrng | wc -c)", "got=4096")
    assert booted.rng.stats.bytes_to_guest - before >= 4096


def test_the_guest_configures_eth0_and_pings_the_host(booted):
    console = booted.console
    shell(console, f"ip addr add {GUEST_IP}/24 dev eth0; ip link set eth0 up; echo up=$((2+3))", "up=5")
    shell(console, f"ping -c 3 -W 5 {HOST_IP} >/dev/null; echo ping=$?", "ping=0")
    neighbours = ip(booted.netns, "neigh", "show", "dev", TAP)
    assert GUEST_IP in neighbours


def test_vsock_both_ways(booted):
    """The host reaches the guest agent's listener, and a guest program reaches ``Vsock.listen``."""
    assert booted.vm.exec(["echo", "host-to-guest"], timeout=SHELL_TIMEOUT).stdout == b"host-to-guest\n"
    answered = threading.Event()

    def answer(listener: socket.socket) -> None:
        connection, _ = listener.accept()
        with connection:
            asked = b""
            while chunk := connection.recv(4096):
                asked += chunk
            connection.sendall(b"host-answers:" + asked.strip())
        answered.set()

    with booted.vsock.listen(5000) as listener:
        listener.settimeout(SHELL_TIMEOUT)
        server = threading.Thread(target=answer, args=(listener,), daemon=True)
        server.start()
        shell(
            booted.console, "echo guest-asks | kvmkit-agent --connect 5000; echo", "host-answers:guest-asks"
        )
        server.join(SHELL_TIMEOUT)
    assert answered.is_set()


# --------------------------------------------------------------------------- the command line


@contextlib.contextmanager
def kvmkit_run(*args: str) -> Iterator[pexpect.spawn]:
    """`python -m kvmkit run` with `args` on a terminal; when the block ends, Ctrl-A x quits it,
    which must end the process with status 0."""
    child = pexpect.spawn(
        sys.executable,
        ["-m", "kvmkit", "run", *args],
        timeout=BOOT_TIMEOUT,
        env=dict(os.environ, TERM="dumb"),
    )
    try:
        yield child
        child.send(b"\x01x")
        child.expect("guest stopped: ", timeout=SHELL_TIMEOUT)
        child.expect(pexpect.EOF, timeout=SHELL_TIMEOUT)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, child.before


def test_kvmkit_run_on_a_terminal_reaches_the_shell_and_quits_with_ctrl_a_x(guest):
    with kvmkit_run("--cpus", "1") as child:
        child.expect("Ctrl-A x quits")
        child.expect(READY_MARKER)
        child.sendline("echo pty-$((3 * 7))")
        child.expect("pty-21", timeout=SHELL_TIMEOUT)


def test_kvmkit_run_waits_for_gdb_and_lets_it_attach_again(guest):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with kvmkit_run("--cpus", "2", "--gdb", f"127.0.0.1:{port}", "--wait") as child:
        child.expect("waiting for gdb", timeout=SHELL_TIMEOUT)
        # gdb attaches before the first instruction, reads the registers and detaches.
        with GdbRemote(port, timeout=SHELL_TIMEOUT) as gdb:
            assert gdb.ask("?").startswith("T05")
            assert gdb.ask("qfThreadInfo") == "m01,02", "a thread per vCPU"
            regs = bytes.fromhex(gdb.ask("g"))
            cr0 = int.from_bytes(regs[-48:-40], "little")  # cr0, cr2, cr3, cr4, cr8, efer end the block
            assert cr0 & 1, "the kernel is entered in protected or long mode"
            assert gdb.ask("D") == "OK"
        child.expect(READY_MARKER)
        # gdb attaches to the running guest, stops it and detaches; the shell goes on.
        with GdbRemote(port, timeout=SHELL_TIMEOUT) as gdb:
            assert gdb.ask("?").startswith("T05")
            assert gdb.ask("D") == "OK"
        child.sendline("echo gdb-$((6 * 7))")
        child.expect("gdb-42", timeout=SHELL_TIMEOUT)
