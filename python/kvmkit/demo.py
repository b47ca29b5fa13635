"""The demo: run the bundled greeting guest and serve its I/O from Python.

The guest (``guests/greeting.S``) is 64-bit code. It asks the host for a name through port 0xE8,
one byte per ``in``, and writes its greeting to port 0xE9, which a Python handler collects.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import resources

from kvmkit.exits import Exit
from kvmkit.vm import VM

NAME_PORT = 0xE8
CONSOLE_PORT = 0xE9
LOAD_ADDR = 0x10_0000
STACK_TOP = 0x8_0000


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
