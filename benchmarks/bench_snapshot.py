"""Snapshots: in-place reset, fork and restore from files, each against a floor measured in the
same run, in alternating rounds; each ratio is the median of the rounds' ratios.

- In-place reset: a 2 MiB one-vCPU VM runs ``guests/page_writer.S``, which adds 1 to a dword in
  each of 64 pages and stops at an ``out`` (untimed), then ``vm.restore(snap)`` puts it back
  (timed). The floor is ``baseline.c reset``: the same guest and VM, dirty logging on its memory
  slot, and per reset ``KVM_GET_DIRTY_LOG``, a copy of each page it names from a saved copy,
  ``KVM_SET_CLOCK`` and the vCPU ioctls kvmkit's in-place restore issues, timed alone. Also with
  KVM's irqchip and PIT on both sides.
- Fork: ``vm.fork()`` of a 256 MiB VM whose guest wrote 32 MiB before its first snapshot, against
  creating an empty ``kvmkit.VM(memory="256M")`` and against ``baseline.c create`` (VM, memory
  slot, vCPU, CPUID); and what idle clones add to the process's memory (``smaps_rollup``).
- Restore from files: ``kvmkit.VM.from_snapshot(dir)`` of a saved 256 MiB and a 2 GiB VM that
  wrote the same 32 MiB, against each other and against creating an empty VM of the same size.

A small VM stays alive throughout, as in a process that serves VMs: KVM keeps a static key on
while any vCPU without an in-kernel LAPIC exists, and when the last one goes, every VM created
and destroyed after it patches kernel text twice (about 0.3 ms on a 2-CPU host), which would
weigh on every creation measured here.

Where this host's KVM is paravirtualized (``kvm_pvm``) or missing, it runs itself inside kvmkit's
nested machine (``--where`` chooses).

Usage: python benchmarks/bench_snapshot.py [--quick] [--rounds N] [--resets N] [--forks N]
       [--loads N] [--json PATH] [--where auto|here|nested]
"""

from __future__ import annotations

import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import kvmkit
import placement
from bench_exits import build
from kvmkit import nested
from report import write_report

HERE = Path(__file__).resolve().parent
LOAD_ADDR = 0x1000
PORT = 0x3F0  # the page writer's OUT (its DX), whose handler ends each run
DIRTY_BASE = 0x10_0000  # the page writer's first page (its EBX), as in baseline.c
PAGE = 4096
RESET_PAGES = 64
TOUCHED = 32 << 20  # what the guest of the fork and file cases writes before its snapshot
CLONES = 50  # idle clones per batch of the memory measurement
CLONE_BATCHES = 4
FILE_SIZES = {"256M": 256 << 20, "2G": 2 << 30}
PHASES = ("memory_us", "vm_us", "vcpus_us", "devices_us")

Rounds = list[list[float]]  # per round, each sample


def page_writer(guest: bytes, memory: str, pages: int, irqchip: bool = False) -> kvmkit.VM:
    """A VM whose guest has written ``pages`` pages once and stopped at its OUT."""
    vm = kvmkit.VM(memory=memory, irqchip=irqchip, pit=irqchip)
    vm.mem_write(LOAD_ADDR, guest)
    cpu = vm.vcpus[0]
    cpu.setup("protected", entry=LOAD_ADDR)
    for register, value in (("rbx", DIRTY_BASE), ("rsi", pages), ("rdx", PORT)):
        cpu.reg_write(register, value)
    vm.hook_io(PORT, 1, write=lambda port, data: vm.stop())
    run_to_port(vm)
    return vm


def run_to_port(vm: kvmkit.VM) -> None:
    exit_ = vm.run(timeout=60)
    if exit_.reason is not kvmkit.ExitReason.STOPPED:
        raise RuntimeError(f"page writer ended with {exit_}")


def c_floor(binary: Path, *args: object) -> dict[str, Any]:
    out = subprocess.run([binary, *map(str, args)], check=True, capture_output=True)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def timed(make: Callable[[], kvmkit.VM], count: int) -> list[float]:
    """µs of each of ``count`` calls of ``make``; each VM is closed after, untimed."""
    times = []
    for _ in range(count):
        started = time.perf_counter()
        vm = make()
        times.append((time.perf_counter() - started) * 1e6)
        vm.close()
    return times


def medians(rounds: Rounds) -> list[float]:
    return [statistics.median(samples) for samples in rounds]


def spread(rounds: Rounds) -> dict[str, float]:
    """Median and 99th percentile of every sample of every round."""
    samples = [value for round_ in rounds for value in round_]
    p99 = statistics.quantiles(samples, n=100)[98] if len(samples) > 1 else samples[0]
    return {"median": statistics.median(samples), "p99": p99}


def ratio_row(
    case: str, floor: str, base: Rounds, kit: Rounds, goal: float | None, unit: str = "µs"
) -> dict[str, Any]:
    """Both sides' medians and the median of the rounds' ratios of medians (each round measures
    both sides back to back, which cancels a shared machine's slow drifts)."""
    base_medians, kit_medians = medians(base), medians(kit)
    ratio = statistics.median(k / b for k, b in zip(kit_medians, base_medians))
    return {
        "case": case,
        "unit": unit,
        "floor": floor,
        "floor_value": statistics.median(base_medians),
        "kvmkit": statistics.median(kit_medians),
        "ratio": ratio,
        "goal": None if goal is None else f"<= {goal}x",
        "met": None if goal is None else ratio <= goal,
        "floor_rounds": base_medians,
        "kvmkit_rounds": kit_medians,
    }


# In-place reset


def kvmkit_resets(
    guest: bytes, count: int, irqchip: bool
) -> tuple[list[float], list[dict[str, float]], float]:
    """µs of each of ``count`` resets of the 64-page writer, what ``restore`` reported, and the
    seconds the guest's runs and the resets took together."""
    vm = page_writer(guest, "2M", RESET_PAGES, irqchip)
    snap = vm.snapshot()
    regs = vm.vcpus[0].regs
    # The first restore finds the MSRs KVM will not take back, as the floor's first does.
    run_to_port(vm)
    vm.restore(snap)
    times, reports = [], []
    loop_started = time.perf_counter()
    for _ in range(count):
        run_to_port(vm)
        started = time.perf_counter()
        vm.restore(snap)
        times.append((time.perf_counter() - started) * 1e6)
        report = vm.last_restore
        assert report is not None
        reports.append(report)
    loop_seconds = time.perf_counter() - loop_started
    if vm.vcpus[0].regs != regs or vm.mem_read(DIRTY_BASE, PAGE) != snap.mem_read(DIRTY_BASE, PAGE):
        raise RuntimeError("the VM differs from its snapshot after a reset")
    vm.close()
    return times, reports, loop_seconds


def reset_rounds(binary: Path, writer: Path, guest: bytes, rounds: int, resets: int) -> dict[str, Any]:
    c: dict[bool, Rounds] = {False: [], True: []}
    kit: dict[bool, Rounds] = {False: [], True: []}
    reports: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    c_phases: dict[str, list[float]] = {phase: [] for phase in PHASES[:3]}
    pages_copied: set[int] = set()
    cycles = []
    for _ in range(rounds):
        for irqchip in (False, True):
            floor = c_floor(binary, "reset", writer, resets, RESET_PAGES, PORT, int(irqchip))
            c[irqchip].append(floor["us"])
            pages_copied |= {floor["pages_copied_min"], floor["pages_copied_max"]}
            if not irqchip:
                for phase, values in c_phases.items():
                    values.extend(floor[phase])
            times, round_reports, seconds = kvmkit_resets(guest, resets, irqchip)
            if not irqchip:
                cycles.append(resets / seconds)
            kit[irqchip].append(times)
            reports[irqchip].extend(round_reports)
    pages_copied |= {int(report["pages_copied"]) for both in reports.values() for report in both}

    def phase_medians(irqchip: bool) -> dict[str, float]:
        return {phase: statistics.median(r[phase] for r in reports[irqchip]) for phase in PHASES}

    kit_all = [t for round_ in kit[False] for t in round_]
    # What restore() costs beyond its phases: the call from Python, locks, the GIL.
    outside = [
        total - sum(report[phase] for phase in PHASES) for total, report in zip(kit_all, reports[False])
    ]
    return {
        "rows": [
            ratio_row("reset, 64 dirty pages", "C", c[False], kit[False], 1.3),
            ratio_row("reset, irqchip + PIT", "C", c[True], kit[True], None),
        ],
        "kvmkit_us": spread(kit[False]),
        "c_us": spread(c[False]),
        "kvmkit_irqchip_us": spread(kit[True]),
        "resets_per_second": 1e6 / statistics.fmean(kit_all),
        "runs_and_resets_per_second": statistics.median(cycles),
        "kvmkit_phases_us": {**phase_medians(False), "outside_phases": statistics.median(outside)},
        "c_phases_us": {phase: statistics.median(values) for phase, values in c_phases.items()},
        "kvmkit_irqchip_phases_us": phase_medians(True),
        "pages_copied": sorted(pages_copied),
    }


# Fork


def smaps_rollup() -> dict[str, int]:
    """The process's memory figures, in KiB."""
    fields = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        name, value, *_ = line.split()
        fields[name.rstrip(":")] = int(value)
    return fields


def clone_memory(parent: kvmkit.VM) -> dict[str, Any]:
    """KiB each idle clone adds to the process's resident and proportional set, over
    ``CLONE_BATCHES`` batches of ``CLONES`` (the first batch alone may fit in memory the heap had
    free already). Measured before anything else has freed memory the clones could reuse. What
    KVM allocates in the kernel for each VM is not the process's and not counted."""
    fields = ("Rss", "Pss", "Anonymous")
    gc.collect()
    start = smaps_rollup()
    clones: list[kvmkit.VM] = []
    first_batch: dict[str, float] = {}
    for batch in range(CLONE_BATCHES):
        before = smaps_rollup()
        batch_clones = parent.fork(CLONES)
        assert isinstance(batch_clones, list)
        clones += batch_clones
        gc.collect()
        after = smaps_rollup()
        if batch == 0:
            first_batch = {name: (after[name] - before[name]) / CLONES for name in fields}
    end = smaps_rollup()
    for clone in clones:
        clone.close()
    return {
        "clones": len(clones),
        "process": {name: (end[name] - start[name]) / len(clones) for name in fields},
        f"process_first_{CLONES}": first_batch,
    }


def fork_rounds(binary: Path, guest: bytes, rounds: int, forks: int) -> dict[str, Any]:
    parent = page_writer(guest, "256M", TOUCHED // PAGE)
    started = time.perf_counter()
    parent.snapshot()  # moves memory into the memory file the forks share
    first_snapshot_ms = (time.perf_counter() - started) * 1e3
    memory = clone_memory(parent)

    def fork() -> kvmkit.VM:
        clone = parent.fork()
        assert isinstance(clone, kvmkit.VM)
        return clone

    with fork() as clone:
        if (
            clone.mem_read(DIRTY_BASE, 4) != (1).to_bytes(4, "little")
            or clone.vcpus[0].regs != parent.vcpus[0].regs
        ):
            raise RuntimeError("a clone differs from its parent")

    def snapshot_then_clone() -> tuple[float, float]:
        """µs of a fork's two parts: the snapshot, then the VM made from it."""
        started = time.perf_counter()
        snap = parent.snapshot()
        taken = time.perf_counter()
        clone = kvmkit.VM.from_snapshot(snap)
        done = time.perf_counter()
        clone.close()
        return (taken - started) * 1e6, (done - taken) * 1e6

    c: Rounds = []
    empty: Rounds = []
    forked: Rounds = []
    parts: list[tuple[float, float]] = []
    for _ in range(rounds):
        c.append(c_floor(binary, "create", 256 << 20, forks)["us"])
        empty.append(timed(partial(kvmkit.VM, memory="256M"), forks))
        forked.append(timed(fork, forks))
        parts.extend(snapshot_then_clone() for _ in range(forks))
    parent.close()
    return {
        "rows": [
            ratio_row("fork, 256 MiB", "empty kvmkit VM", empty, forked, 1.5),
            ratio_row("fork, 256 MiB", "empty VM in C", c, forked, 1.5),
            ratio_row("empty kvmkit VM, 256 MiB", "empty VM in C", c, empty, None),
            {
                "case": "idle clone, process memory",
                "unit": "KiB",
                "kvmkit": memory["process"]["Rss"],
                "goal": "< 300 KiB",
                "met": memory["process"]["Rss"] < 300,
            },
        ],
        "fork_us": spread(forked),
        "fork_parts_us": {
            "snapshot": statistics.median(part[0] for part in parts),
            "new_vm": statistics.median(part[1] for part in parts),
        },
        "first_snapshot_ms": first_snapshot_ms,
        "idle_clone_kib": memory,
    }


# Restore from files


def load_then_clone(path: Path) -> tuple[float, float]:
    """µs of the two parts of ``VM.from_snapshot(path)``: reading the snapshot, then the VM."""
    started = time.perf_counter()
    snap = kvmkit.Snapshot.load(path)
    read = time.perf_counter()
    vm = kvmkit.VM.from_snapshot(snap)
    done = time.perf_counter()
    vm.close()
    return (read - started) * 1e6, (done - read) * 1e6


def file_rounds(binary: Path, guest: bytes, workdir: Path, rounds: int, loads: int) -> dict[str, Any]:
    for size in FILE_SIZES:
        vm = page_writer(guest, size, TOUCHED // PAGE)
        vm.snapshot().save(workdir / size)
        vm.close()
    with kvmkit.VM.from_snapshot(workdir / "2G") as vm:
        if vm.mem_read(DIRTY_BASE + TOUCHED - PAGE, 4) != (1).to_bytes(4, "little"):
            raise RuntimeError("a VM restored from files lacks what its guest wrote")

    loaded: dict[str, Rounds] = {size: [] for size in FILE_SIZES}
    empty: dict[str, Rounds] = {size: [] for size in FILE_SIZES}
    c: dict[str, Rounds] = {size: [] for size in FILE_SIZES}
    parts: dict[str, list[tuple[float, float]]] = {size: [] for size in FILE_SIZES}
    for _ in range(rounds):
        for size, size_bytes in FILE_SIZES.items():
            path = workdir / size
            c[size].append(c_floor(binary, "create", size_bytes, loads)["us"])
            empty[size].append(timed(partial(kvmkit.VM, memory=size), loads))
            loaded[size].append(timed(partial(kvmkit.VM.from_snapshot, path), loads))
            parts[size].extend(load_then_clone(path) for _ in range(max(1, loads // 4)))
    return {
        "rows": [
            ratio_row("from files, 2 GiB", "from files, 256 MiB", loaded["256M"], loaded["2G"], 1.2),
            ratio_row("empty kvmkit VM, 2 GiB", "empty kvmkit VM, 256 MiB", empty["256M"], empty["2G"], None),
            ratio_row("empty VM in C, 2 GiB", "empty VM in C, 256 MiB", c["256M"], c["2G"], None),
            ratio_row("from files, 256 MiB", "empty kvmkit VM", empty["256M"], loaded["256M"], 2.0),
            ratio_row("from files, 2 GiB", "empty kvmkit VM", empty["2G"], loaded["2G"], 2.0),
        ],
        "from_files_us": {size: spread(loaded[size]) for size in FILE_SIZES},
        "parts_us": {
            size: {
                "snapshot_load": statistics.median(part[0] for part in parts[size]),
                "new_vm": statistics.median(part[1] for part in parts[size]),
            }
            for size in FILE_SIZES
        },
    }


def print_summary(reset: dict[str, Any], fork: dict[str, Any], files: dict[str, Any]) -> None:
    rows = reset["rows"] + fork["rows"] + files["rows"]
    print(f"{'case':28} {'floor':>24} {'floor':>9} {'kvmkit':>9} {'ratio':>7}  goal")
    for r in rows:
        goal = "" if r["goal"] is None else f"{r['goal']} {'met' if r['met'] else 'MISSED'}"
        if "floor" in r:
            floor, ratio = f"{r['floor']:>24} {r['floor_value']:9.1f}", f"{r['ratio']:6.2f}x"
        else:
            floor, ratio = f"{'':>34}", f"{r['unit']:>7}"
        print(f"{r['case']:28} {floor} {r['kvmkit']:9.1f} {ratio}  {goal}")
    kit, c = reset["kvmkit_us"], reset["c_us"]
    print(
        f"reset (µs): kvmkit median {kit['median']:.1f}, p99 {kit['p99']:.1f}; C median {c['median']:.1f}, "
        f"p99 {c['p99']:.1f}; kvmkit {reset['resets_per_second']:.0f} resets/s, "
        f"{reset['runs_and_resets_per_second']:.0f}/s with the guest's runs; "
        f"pages copied {reset['pages_copied']}"
    )
    for name in ("kvmkit_phases_us", "c_phases_us", "kvmkit_irqchip_phases_us"):
        print(f"  {name[:-3]}: " + ", ".join(f"{phase} {us:.1f}" for phase, us in reset[name].items()))
    memory = fork["idle_clone_kib"]
    print(
        f"fork (µs): median {fork['fork_us']['median']:.0f}, p99 {fork['fork_us']['p99']:.0f}; snapshot "
        f"{fork['fork_parts_us']['snapshot']:.0f} + new VM {fork['fork_parts_us']['new_vm']:.0f}; "
        f"first snapshot {fork['first_snapshot_ms']:.1f} ms"
    )
    per_clone = ", ".join(f"{name} {kib:.1f}" for name, kib in memory["process"].items())
    first = ", ".join(f"{name} {kib:.1f}" for name, kib in memory[f"process_first_{CLONES}"].items())
    print(f"  per idle clone (KiB), {memory['clones']} clones: {per_clone} (first {CLONES}: {first})")
    for size, part in files["parts_us"].items():
        spread_ = files["from_files_us"][size]
        print(
            f"from files, {size} (µs): median {spread_['median']:.0f}, p99 {spread_['p99']:.0f}; "
            f"Snapshot.load {part['snapshot_load']:.0f} + new VM {part['new_vm']:.0f}"
        )


def main() -> int:
    parser = placement.parser(__doc__, "snapshot.json", "fewer rounds and repetitions")
    parser.add_argument("--resets", type=int, help="resets per round of each reset case")
    parser.add_argument("--forks", type=int, help="forks (and empty VMs) per round")
    parser.add_argument("--loads", type=int, help="restores from files (and empty VMs) per round and size")
    args = parser.parse_args()
    status = placement.relaunch(args, __file__, cpus=1)
    if status is not None:
        return status
    if args.quick:
        defaults = (3, 300, 20, 10)
    elif nested.inside():
        defaults = (5, 300, 20, 10)
    else:
        defaults = (9, 2000, 100, 40)
    rounds = args.rounds or defaults[0]
    resets = args.resets or defaults[1]
    forks = args.forks or defaults[2]
    loads = args.loads or defaults[3]
    print(
        f"{rounds} rounds: {resets} resets, {forks} forks, {loads} restores from files per case", flush=True
    )

    with tempfile.TemporaryDirectory(prefix="kvmkit-bench-") as tmp, kvmkit.VM(memory="2M"):
        workdir = Path(tmp)
        baseline, guests = build(workdir)
        guest = guests["page_writer"]
        fork = fork_rounds(baseline, guest, rounds, forks)
        print(f"  fork: {fork['fork_us']['median']:.0f} µs", flush=True)
        reset = reset_rounds(baseline, workdir / "page_writer.bin", guest, rounds, resets)
        print(f"  reset: {reset['kvmkit_us']['median']:.1f} µs", flush=True)
        files = file_rounds(baseline, guest, workdir, rounds, loads)

    print_summary(reset, fork, files)
    print(f"on {placement.describe()}")
    write_report(
        args.json,
        where=placement.describe(),
        rounds=rounds,
        resets=resets,
        forks=forks,
        loads=loads,
        results=reset["rows"] + fork["rows"] + files["rows"],
        reset={key: value for key, value in reset.items() if key != "rows"},
        fork={key: value for key, value in fork.items() if key != "rows"},
        files={key: value for key, value in files.items() if key != "rows"},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
