"""Freestanding C guests for the benchmarks, on the runtime in tests/guests/c (guest.h has the
conventions): built with the flags the test suite uses, loaded at 1 MiB and entered in long mode
with RDI = the argument. Port 0x600 takes main's return value, port 0x604 debug text and port
0x610 the phase marks of guests/bench.h, which are stamped with the host's clock as they exit.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import kvmkit

# The guests' runtime and its toolchain are the test suite's.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from support import C_DEBUG_PORT as DEBUG_PORT
from support import C_EXIT_PORT as EXIT_PORT
from support import C_STACK_TOP as STACK_TOP
from support import CImage as CGuest
from support import build_c_guest, run_build_step

MARK_PORT = 0x610  # BENCH_MARK_PORT in guests/bench.h


@dataclass(frozen=True)
class Phase:
    """One phase of a guest (bench.h marks): host seconds from its start mark to its end mark,
    and what the run's ``snapshot`` returned at each."""

    seconds: float
    before: object
    after: object


@dataclass(frozen=True)
class GuestRun:
    """How a guest run went: main's return value, its debug text and its phases in order."""

    code: int
    text: str
    phases: list[Phase]


def build_guest(source: Path, outdir: Path, include: Sequence[Path] = ()) -> CGuest:
    """Compiles and links ``source`` with the runtime and flattens it for loading."""
    if not all(shutil.which(tool) for tool in ("gcc", "objcopy")):
        raise RuntimeError("building C guests needs gcc and GNU binutils")
    return build_c_guest(source, outdir, include)


def build_host(source: Path, out: Path, include: Sequence[Path] = ()) -> Path:
    """Compiles a host-side C program (a baseline) with optimisation."""
    run_build_step(
        ["cc", "-O2", "-std=gnu11", "-Wall", "-Wextra", *(f"-I{p}" for p in include), "-o", out, source]
    )
    return out


def run_guest(
    vm: kvmkit.VM,
    guest: CGuest,
    arg: int,
    *,
    snapshot: Callable[[], object] = lambda: None,
    timeout: float = 600,
) -> GuestRun:
    """Loads ``guest`` into ``vm``, runs it on vCPU 0 until it halts, and checks that it reported
    exactly once and marked phases 0, 1, ... each started and ended in turn. A Python handler
    stamps the marks with ``time.perf_counter()`` and calls ``snapshot`` (device counters, say)."""
    ram_end = max(addr + size for addr, size in vm.memory_regions if addr < 1 << 32)
    if guest.end > ram_end:
        raise RuntimeError(f"the guest needs RAM up to {guest.end:#x}, the VM has {ram_end:#x}")
    vm.mem_write(guest.load_addr, guest.image)
    codes: list[int] = []
    debug = bytearray()
    marks: list[tuple[int, float, object]] = []

    def mark(_port: int, data: bytes) -> None:
        now = time.perf_counter()
        marks.append((int.from_bytes(data, "little"), now, snapshot()))

    vm.hook_io(EXIT_PORT, 4, write=lambda _p, data: codes.append(int.from_bytes(data, "little", signed=True)))
    vm.hook_io(DEBUG_PORT, write=lambda _p, data: debug.extend(data))
    vm.hook_io(MARK_PORT, 4, write=mark)
    cpu = vm.vcpus[0]
    cpu.reg_write("rdi", arg)
    cpu.setup("long", entry=guest.entry, stack=STACK_TOP)
    exit_ = vm.run(timeout=timeout)
    text = debug.decode(errors="replace")
    if exit_.reason is not kvmkit.ExitReason.HLT or len(codes) != 1:
        raise RuntimeError(f"guest run ended with {exit_}, exit codes {codes}; debug text:\n{text}")
    values = [value for value, _, _ in marks]
    if values != list(range(len(marks))) or len(marks) % 2:
        raise RuntimeError(f"guest returned {codes[0]:#x} after marking {values}; debug text:\n{text}")
    phases = [Phase(end[1] - start[1], start[2], end[2]) for start, end in zip(marks[::2], marks[1::2])]
    return GuestRun(codes[0], text, phases)
