"""The demos: boot the default Linux guest and run a command in it; and the bundled greeting
guest, raw 64-bit code whose I/O is served from Python.

The greeting guest (``guests/greeting.S``) asks the host for a name through port 0xE8, one byte
per ``in``, and writes its greeting to port 0xE9, which a Python handler collects.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import resources

from kvmkit.agent import ExecResult
from kvmkit.errors import AgentError, ConsoleTimeout
from kvmkit.exits import Exit
from kvmkit.vm import VM

NAME_PORT = 0xE8
CONSOLE_PORT = 0xE9
LOAD_ADDR = 0x10_0000
STACK_TOP = 0x8_0000
GUEST_CID = 3


@dataclass(frozen=True)
class DemoResult:
    output: str
    exit: Exit
    seconds: float
    io_exits: int


def greeting_guest() -> bytes:
    """The greeting guest's machine code."""
    return resources.files("kvmkit").joinpath("guests/greeting.bin").read_bytes()


def run_greeting(name: str, timeout: float = 10.0) -> DemoResult:
    """Boots the greeting guest, answers with ``name`` and returns what it printed."""
    pending = bytearray(name.encode() + b"\0")
    printed = bytearray()

    def next_name_byte(port: int, size: int) -> int:
        return pending.pop(0) if pending else 0

    with VM(memory="2M") as vm:
        vm.mem_write(LOAD_ADDR, greeting_guest())
        vm.vcpus[0].setup("long", entry=LOAD_ADDR, stack=STACK_TOP)
        vm.hook_io(NAME_PORT, read=next_name_byte)
        vm.hook_io(CONSOLE_PORT, write=lambda port, data: printed.extend(data))
        started = time.perf_counter()
        exit_ = vm.run(timeout=timeout)
        seconds = time.perf_counter() - started
        return DemoResult(printed.decode(errors="replace"), exit_, seconds, vm.stats["io_exits"])


# Kernel messages that mark how far a boot got, in boot order.
MILESTONES = [
    ("kernel banner", rb"Linux version \S+"),
    ("command line", rb"Command line: "),
    ("memory map", rb"BIOS-e820: "),
    ("CPUs counted", rb"smpboot: Allowing \d+ CPUs"),
    ("all CPUs up", rb"smp: Brought up \d+ nodes?, \d+ CPUs?"),
    ("init started", rb"Run /init as init process"),
    ("guest ready", rb"kvmkit-guest-ready"),
]
# Instructions an unmodified kernel runs that paravirtualized KVM's emulator cannot.
EMULATOR_SAFE_CMDLINE = "clearcpuid=cx16 noxsave"
PARAVIRTUAL_KVM = "/sys/module/kvm_pvm"


@dataclass(frozen=True)
class LinuxDemoResult:
    exit: Exit
    milestone: str | None
    """The furthest boot milestone the console showed."""
    command_output: str | None
    """What the command printed on the console, if the guest got as far as running it."""
    exec_result: ExecResult | None
    """What the same command gave through the guest agent (``vm.exec``)."""
    seconds: float


def furthest_milestone(output: bytes) -> str | None:
    """The last of :data:`MILESTONES` that ``output`` shows."""
    reached = [name for name, pattern in MILESTONES if re.search(pattern, output)]
    return reached[-1] if reached else None


def run_linux(
    command: str = "uname -a", cpus: int = 2, timeout: float = 900.0, echo: bool = True
) -> LinuxDemoResult:
    """Boots the default guest, runs ``command`` in its shell on the console and once more through
    the guest agent, and powers it off. On hosts whose KVM cannot run an unmodified kernel to the
    end, returns how far it got."""
    from kvmkit.images import READY_MARKER, default_guest

    guest = default_guest()
    cmdline = guest.cmdline
    if os.path.exists(PARAVIRTUAL_KVM):
        cmdline += " " + EMULATOR_SAFE_CMDLINE
    started = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="kvmkit-demo-") as work,
        VM(memory="256M", cpus=cpus, irqchip=True, pit=True) as vm,
    ):
        vm.add_vsock(GUEST_CID, os.path.join(work, "vsock.sock"))
        console = vm.boot_linux(guest.vmlinux, initrd=guest.initrd, cmdline=cmdline)
        if echo:
            console.log_to(sys.stdout)
        vm.start()
        output = result = None
        try:
            console.expect(READY_MARKER.encode(), timeout=timeout)
            console.sendline(f"echo kvmkit-begin; {command}; echo kvmkit-end")
            console.expect(rb"kvmkit-begin\r?\n")
            output = console.expect(rb"(?s)(.*?)kvmkit-end", timeout=60).group(1).decode(errors="replace")
            result = vm.exec(command, timeout=60)
            console.sendline("poweroff -f")
        except (ConsoleTimeout, AgentError):
            vm.stop()
        exit_ = vm.wait(timeout=60)
        return LinuxDemoResult(
            exit_, furthest_milestone(console.output), output, result, time.perf_counter() - started
        )
