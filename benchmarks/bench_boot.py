"""Boot time of the default guest: kvmkit against QEMU's microvm booting the same kernel,
initramfs and command line in the same run, with 1 and 2 vCPUs, and kvmkit's memory overhead.

Rounds alternate between the two sides (kvmkit first in even rounds, QEMU first in odd ones);
the table gives medians and the ratio of the medians. The comparison is the time to the init's
ready marker on the console:

- kvmkit, wall: from ``kvmkit.VM(...)`` (VM creation, ``boot_linux``, ``start``) to the marker;
  kvmkit's boot timer (``vm.boot_time``: from the first start to the init's write to the timer)
  is given too.
- QEMU, wall: from starting ``qemu-system-x86_64 -M microvm -enable-kvm`` to the marker, so its
  process start and firmware count, as kvmkit's VM creation and loading do.

kvmkit's time is broken down into set-up (VM creation), loading (``boot_linux``), the kernel until
its first console line, the kernel until ``Run /init``, and init until the ready marker.

Without ``earlyprintk`` a kernel's early messages reach the serial console together when the
console driver registers, so "first console line" is that moment.

It needs a KVM with hardware semantics: where this host's KVM is paravirtualized (``kvm_pvm``,
which cannot boot an unmodified kernel to user space) or missing, the benchmark runs itself
inside kvmkit's nested machine (``kvmkit.nested``; ``--where`` chooses). There the milestones are
the furthest both sides reach.

VMM memory overhead (one extra boot on each side): kvmkit's is the process's resident memory minus
the guest memory it has touched minus what the process used before creating the VM (what kvmkit
adds to a Python program); QEMU's is its process's resident memory minus its guest RAM. The whole
kvmkit process (Python included) is given against QEMU's too, and Firecracker's published 5 MiB.

Usage: python benchmarks/bench_boot.py [--rounds N] [--cpus 1,2] [--where auto|here|nested]
       [--timeout SECONDS] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import re
import selectors
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import kvmkit
import placement
from kvmkit import nested
from kvmkit.demo import EMULATOR_SAFE_CMDLINE
from kvmkit.images import READY_MARKER, default_guest
from report import write_report

MEMORY = "256M"
FIRECRACKER_OVERHEAD_MIB = 5.0
#: The goal: kvmkit's VMM memory overhead at most this share of the QEMU process's.
MEMORY_GOAL_RATIO = 0.5
#: The goal: kvmkit's time to the ready marker at most this share of QEMU microvm's.
GOAL_RATIO = 0.58
#: Seconds the benchmark lets QEMU's console output gather before reading it.
CONSOLE_BATCH = 0.01
#: Console milestones, in boot order: (key, pattern).
MILESTONES = [
    ("first_line", rb"Linux version \S+"),
    ("run_init", rb"Run /init as init process"),
    ("ready", READY_MARKER.encode()),
]

Timeline = list[tuple[float, bytes]]


def reached(timeline: Timeline) -> dict[str, float]:
    """Seconds to each milestone, from lines stamped with their arrival time."""
    seen: dict[str, float] = {}
    for stamp, line in timeline:
        for name, pattern in MILESTONES:
            if name not in seen and re.search(pattern, line):
                seen[name] = stamp
    return seen


def collect(read: Callable[[], bytes], started: float, timeout: float, alive: Callable[[], bool]) -> Timeline:
    """Stamps console lines with the time since ``started`` until the ready marker shows."""
    timeline: Timeline = []
    pending = b""
    marker = READY_MARKER.encode()
    while time.perf_counter() - started < timeout and alive():
        data = read()
        now = time.perf_counter() - started
        *lines, pending = (pending + data).split(b"\n")
        timeline += [(now, line) for line in lines]
        if marker in pending or any(marker in line for line in lines):
            break
    timeline.append((time.perf_counter() - started, pending))
    return timeline


# --------------------------------------------------------------------------- kvmkit


def boot_kvmkit(kernel: Path, initrd: Path, cmdline: str, cpus: int, timeout: float) -> dict[str, object]:
    """One kvmkit boot: seconds of each phase, from ``VM()`` on."""
    t0 = time.perf_counter()
    with kvmkit.VM(memory=MEMORY, cpus=cpus, irqchip=True, pit=True) as vm:
        t1 = time.perf_counter()
        console = vm.boot_linux(kernel, initrd=initrd, cmdline=cmdline)
        t2 = time.perf_counter()
        vm.start()
        t3 = time.perf_counter()
        timeline = collect(lambda: console.read(timeout=0.2), t0, timeout, lambda: vm.running)
        boot_timer = vm.boot_time
        exits = vm.stats
        vm.stop()
        end = str(vm.wait(timeout=30))
    times = reached(timeline)
    result: dict[str, object] = {
        "setup": t1 - t0,
        "load": t2 - t1,
        "start": t3 - t2,
        "boot_timer": boot_timer,
    }
    result.update({key: float(exits[key]) for key in ("io_exits", "mmio_exits")})
    result.update({f"to_{name}": value for name, value in times.items()})
    if "first_line" in times:
        result["kernel_to_first_line"] = times["first_line"] - (t3 - t0)
    if "run_init" in times:
        result["kernel_to_run_init"] = times["run_init"] - (t3 - t0)
    if "run_init" in times and "ready" in times:
        result["init_to_ready"] = times["ready"] - times["run_init"]
    result["end"] = end if "ready" not in times else "ready"
    return result


def resident_kib(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def resident_mappings(pid: int | str = "self") -> list[tuple[int, int, int]]:
    """``(start, end, resident KiB)`` of each mapping of process ``pid``."""
    mappings: list[tuple[int, int, int]] = []
    low = high = 0
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(maxsplit=1)[0]
        if "-" in head and not head.endswith(":"):
            low, high = (int(x, 16) for x in head.split("-"))
        elif head == "Rss:":
            mappings.append((low, high, int(line.split()[1])))
    return mappings


def guest_resident_kib(start: int, size_kib: int) -> int:
    """Resident pages of the mappings inside ``[start, start + size)``: the guest's RAM."""
    end = start + size_kib * 1024
    return sum(rss for low, high, rss in resident_mappings() if start <= low and high <= end)


def memory_overhead(kernel: Path, initrd: Path, cmdline: str, timeout: float) -> dict[str, float]:
    before = resident_kib()
    with kvmkit.VM(memory=MEMORY, cpus=1, irqchip=True, pit=True) as vm:
        console = vm.boot_linux(kernel, initrd=initrd, cmdline=cmdline)
        started = time.perf_counter()
        vm.start()
        collect(lambda: console.read(timeout=0.2), started, timeout, lambda: vm.running)
        size = kvmkit.parse_size(MEMORY)
        view = vm.mem_view(0, 4096)
        import ctypes

        base = ctypes.addressof(ctypes.c_char.from_buffer(view))
        guest_kib = guest_resident_kib(base, size // 1024)
        del view
        process_kib = resident_kib() - guest_kib
        vm.stop()
        vm.wait(timeout=30)
    return {
        "vmm_overhead_mib": (process_kib - before) / 1024,
        "process_without_guest_mib": process_kib / 1024,
        "guest_touched_mib": guest_kib / 1024,
    }


# --------------------------------------------------------------------------- QEMU


def qemu_command(kernel: Path, initrd: Path, cmdline: str, cpus: int) -> list[str] | None:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return None
    # On paravirtualized KVM QEMU's "host" model asks for MSRs the host refuses: qemu64 there.
    cpu = "host" if nested.host_kvm() is nested.HostKvm.HARDWARE else "qemu64,+x2apic"
    command = [qemu, "-M", "microvm,x-option-roms=off,rtc=on", "-enable-kvm", "-cpu", cpu]
    command += ["-m", MEMORY, "-smp", str(cpus), "-nodefaults", "-no-user-config", "-nographic"]
    command += ["-serial", "stdio", "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline]
    return command


def qemu_overhead_mib(pid: int, guest_bytes: int) -> dict[str, float]:
    """QEMU's resident memory without its guest RAM (the mappings at least as large as it)."""
    mappings = resident_mappings(pid)
    guest = sum(rss for low, high, rss in mappings if high - low >= guest_bytes)
    total = sum(rss for _, _, rss in mappings)
    return {"qemu_overhead_mib": (total - guest) / 1024, "qemu_guest_touched_mib": guest / 1024}


def boot_qemu(command: list[str], timeout: float, measure_memory: bool = False) -> dict[str, object]:
    started = time.perf_counter()
    child = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert child.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(child.stdout, selectors.EVENT_READ)

    def read() -> bytes:
        if not selector.select(timeout=0.2):
            return b""
        # Let output gather for as long as kvmkit's console keeps a line's start from a waiting
        # reader: waking for each byte QEMU writes would cost QEMU's guest a thread switch each.
        time.sleep(CONSOLE_BATCH)
        return os.read(child.stdout.fileno(), 1 << 16)  # type: ignore[union-attr]

    timeline = collect(read, started, timeout, lambda: child.poll() is None)
    memory = qemu_overhead_mib(child.pid, kvmkit.parse_size(MEMORY)) if measure_memory else {}
    child.kill()
    child.wait(timeout=10)
    selector.close()
    child.stdout.close()
    times = reached(timeline)
    result: dict[str, object] = {f"to_{name}": value for name, value in times.items()}
    result.update(memory)
    tail = b"\n".join(line for _, line in timeline[-3:]).decode(errors="replace").strip()
    result["end"] = (
        "ready" if "ready" in times else f"exit status {child.returncode}; last output: {tail[-300:]}"
    )
    return result


# --------------------------------------------------------------------------- report


def median(rounds: list[dict[str, object]], key: str) -> float | None:
    values = [r[key] for r in rounds if isinstance(r.get(key), float)]
    return statistics.median(values) if values else None  # type: ignore[type-var]


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def run_here(args: argparse.Namespace) -> int:
    guest = default_guest()
    cmdline = guest.cmdline
    if nested.host_kvm() is nested.HostKvm.PARAVIRTUAL:
        cmdline += " " + EMULATOR_SAFE_CMDLINE
    where = placement.describe()
    print(f"kernel {guest.kernel_version}, {MEMORY}, vmlinux + initramfs, on {where}; cmdline: {cmdline}")
    results: list[dict[str, object]] = []
    for cpus in args.cpus:
        command = qemu_command(guest.vmlinux, guest.initrd, cmdline, cpus)
        kit_rounds: list[dict[str, object]] = []
        qemu_rounds: list[dict[str, object]] = []
        for round_ in range(args.rounds):
            sides = ["kvmkit", "qemu"] if round_ % 2 == 0 else ["qemu", "kvmkit"]
            for side in sides:
                if side == "kvmkit":
                    kit_rounds.append(boot_kvmkit(guest.vmlinux, guest.initrd, cmdline, cpus, args.timeout))
                elif command is not None:
                    qemu_rounds.append(boot_qemu(command, args.timeout))
            last = kit_rounds[-1]
            print(
                f"  {cpus} vCPU round {round_ + 1}: kvmkit {seconds(median([last], 'to_ready'))} s"
                f" (boot timer {seconds(median([last], 'boot_timer'))}),"
                f" QEMU {seconds(median(qemu_rounds[-1:], 'to_ready'))} s",
                flush=True,
            )
        results.append({"cpus": cpus, "kvmkit_rounds": kit_rounds, "qemu_rounds": qemu_rounds})

    print(f"\nmedians of {args.rounds} alternating rounds, seconds")
    print(f"{'vCPUs':5} {'milestone':22} {'kvmkit':>8} {'QEMU microvm':>13} {'ratio':>7}")
    summary = []
    for entry in results:
        cpus = entry["cpus"]
        kit, qemu = entry["kvmkit_rounds"], entry["qemu_rounds"]
        assert isinstance(kit, list) and isinstance(qemu, list)
        for name, label in (
            ("first_line", "first console line"),
            ("run_init", "Run /init"),
            ("ready", "ready marker"),
        ):
            k, q = median(kit, f"to_{name}"), median(qemu, f"to_{name}")
            print(f"{cpus:<5} {label:22} {seconds(k):>8} {seconds(q):>13} {ratio(k, q):>7}")
        k, q = median(kit, "to_ready"), median(qemu, "to_ready")
        met = k is not None and q is not None and k / q <= GOAL_RATIO
        print(f"{cpus:<5} {'kvmkit boot timer':22} {seconds(median(kit, 'boot_timer')):>8}")
        print(f"      goal <= {GOAL_RATIO}x QEMU to the ready marker: {'met' if met else 'MISSED'}")
        print("      kvmkit breakdown:", end="")
        for key, label in (
            ("setup", "set-up"),
            ("load", "boot_linux"),
            ("start", "start"),
            ("kernel_to_first_line", "kernel to first line"),
            ("kernel_to_run_init", "kernel to Run /init"),
            ("init_to_ready", "init to ready"),
        ):
            print(f" {label} {seconds(median(kit, key))};", end="")
        print()
        ends = {str(r.get("end")) for r in kit + qemu} - {"ready"}
        if ends:
            print(f"      not every boot reached the marker: {sorted(ends)}")
        summary.append(
            {
                "cpus": cpus,
                "kvmkit_to_ready": k,
                "qemu_to_ready": q,
                "ratio": None if not (k and q) else k / q,
            }
        )

    overhead = memory_overhead(guest.vmlinux, guest.initrd, cmdline, args.timeout)
    command = qemu_command(guest.vmlinux, guest.initrd, cmdline, 1)
    if command is not None:
        overhead.update(boot_qemu(command, args.timeout, measure_memory=True))  # type: ignore[arg-type]
    mib = overhead["vmm_overhead_mib"]
    print(
        f"VMM memory overhead: {mib:.1f} MiB (guest touched {overhead['guest_touched_mib']:.1f} MiB) "
        f"= {mib / FIRECRACKER_OVERHEAD_MIB:.2f}x Firecracker's {FIRECRACKER_OVERHEAD_MIB} MiB; the whole "
        f"process without guest memory, Python included: {overhead['process_without_guest_mib']:.1f} MiB"
    )
    qemu_mib = overhead.get("qemu_overhead_mib")
    if isinstance(qemu_mib, float):
        whole = overhead["process_without_guest_mib"]
        print(
            f"QEMU microvm's process without guest memory: {qemu_mib:.1f} MiB; kvmkit's own "
            f"{mib / qemu_mib:.2f}x, kvmkit's whole process (Python included) {whole / qemu_mib:.2f}x "
            f"(goal <= {MEMORY_GOAL_RATIO}x)"
        )
    write_report(
        args.json,
        where=where,
        guest_kernel=guest.kernel_version,
        cmdline=cmdline,
        rounds=args.rounds,
        summary=summary,
        runs=results,
        memory=overhead,
    )
    return 0


def main() -> int:
    parser = placement.command_line(__doc__, "boot.json")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds per vCPU count")
    parser.add_argument(
        "--cpus", type=lambda s: [int(n) for n in s.split(",")], default=[1, 2], help="vCPU counts, e.g. 1,2"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds each boot may take")
    args = parser.parse_args()
    return placement.run(args, __file__, run_here, cpus=max(args.cpus), linux=True)


if __name__ == "__main__":
    sys.exit(main())
