"""Exit round trip and VM churn: kvmkit against a minimal C KVM loop, in the same run.

The C program (``baseline.c``) is the floor of this machine: the same guests, the same
``KVM_RUN`` loop, no abstraction. Each figure is the median of several alternating rounds, and
each kvmkit figure is reported as a ratio to the C one measured alongside it (the median of the
rounds' ratios).

Where this host's KVM is paravirtualized (``kvm_pvm``) or missing, it runs itself inside kvmkit's
nested machine (``--where`` chooses).

Every exit of the nested machine is emulated (about 100 µs there against a few here), so there it
runs fewer exits and VMs per round by default.

Usage: python benchmarks/bench_exits.py [--quick] [--rounds N] [--exits N] [--churn N]
       [--json PATH] [--where auto|here|nested]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kvmkit
import placement
from kvmkit import devices, nested
from report import write_report

HERE = Path(__file__).resolve().parent
PORT = 0x3F0
MMIO_ADDR = 0xD000_0000
LOAD_ADDR = 0x1000


def build(workdir: Path) -> tuple[Path, dict[str, bytes]]:
    """Compiles the C baseline and assembles the guests both sides run."""
    guests = {}
    for source in sorted((HERE / "guests").glob("*.S")):
        obj, flat = workdir / f"{source.stem}.o", workdir / f"{source.stem}.bin"
        subprocess.run(["as", "--32", "-o", obj, source], check=True)
        subprocess.run(["objcopy", "-O", "binary", "-j", ".text", obj, flat], check=True)
        guests[source.stem] = flat.read_bytes()
    baseline = workdir / "baseline"
    subprocess.run(["cc", "-O2", "-std=c11", "-o", baseline, HERE / "baseline.c"], check=True)
    return baseline, guests


def c_baseline(binary: Path, guest_dir: Path, *args: str) -> dict[str, float]:
    test, guest = args[0], args[1]
    out = subprocess.run(
        [binary, test, guest_dir / f"{guest}.bin", *args[2:]], check=True, capture_output=True
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def kvmkit_exits(guest: bytes, iterations: int, attach: Callable[[kvmkit.VM], None], register: str) -> float:
    """ns per exit of one kvmkit run of an exit-loop guest."""
    with kvmkit.VM(memory="2M", unhandled_io="stop") as vm:
        vm.mem_write(LOAD_ADDR, guest)
        cpu = vm.vcpus[0]
        cpu.setup("protected", entry=LOAD_ADDR)
        cpu.reg_write("rcx", iterations)
        cpu.reg_write(register, PORT if register == "rdx" else MMIO_ADDR)
        attach(vm)
        started = time.perf_counter()
        exit_ = vm.run(timeout=600)
        elapsed = time.perf_counter() - started
        if exit_.reason is not kvmkit.ExitReason.HLT:
            raise RuntimeError(f"benchmark guest ended with {exit_}")
        return elapsed / (iterations + 1) * 1e9


def kvmkit_churn(guest: bytes, count: int) -> float:
    """VMs per second: create, run three instructions to HLT, destroy."""
    started = time.perf_counter()
    for i in range(count):
        with kvmkit.VM(memory="2M") as vm:
            vm.mem_write(LOAD_ADDR, guest)
            vm.vcpus[0].setup("real", entry=LOAD_ADDR)
            exit_ = vm.run()
            if i == 0 and (exit_.reason is not kvmkit.ExitReason.HLT or vm.vcpus[0].regs.rax & 0xFFFF != 3):
                raise RuntimeError(f"churn guest misbehaved: {exit_}")
    return count / (time.perf_counter() - started)


def result_row(
    case: str, unit: str, c: list[float], kit: list[float], goal: float | None, lower_is_better: bool
) -> dict[str, Any]:
    """Medians of both sides, the median of the rounds' ratios, and whether it meets the goal.

    Each round measures both sides back to back, so the ratio within a round cancels the slow
    drifts of a shared machine that the medians of each side alone keep."""
    c_median, kit_median = statistics.median(c), statistics.median(kit)
    ratio = statistics.median(k / f for k, f in zip(kit, c))
    met = None if goal is None else ratio <= goal if lower_is_better else ratio >= goal
    return {
        "case": case,
        "unit": unit,
        "c": c_median,
        "kvmkit": kit_median,
        "ratio": ratio,
        "goal": None if goal is None else f"{'<=' if lower_is_better else '>='} {goal}x",
        "met": met,
        "c_rounds": c,
        "kvmkit_rounds": kit,
    }


def main() -> int:
    parser = placement.parser(__doc__, "exits.json", "fewer exits and rounds")
    parser.add_argument("--exits", type=int, help="exits per round of each exit case")
    parser.add_argument("--churn", type=int, help="VMs per round of the churn case")
    args = parser.parse_args()
    status = placement.relaunch(args, __file__, cpus=1)
    if status is not None:
        return status
    if args.quick:
        defaults = (8192, 2, 200)
    elif nested.inside():
        defaults = (8192, 15, 50)
    else:
        defaults = (65536, 9, 1000)
    iterations = args.exits or defaults[0]
    rounds = args.rounds or defaults[1]
    churn = args.churn or defaults[2]
    print(f"{rounds} rounds: {iterations} exits per exit case, {churn} VMs per churn round", flush=True)

    def null_on(space: str) -> Callable[[kvmkit.VM], None]:
        def attach(vm: kvmkit.VM) -> None:
            if space == "pio":
                vm.add_io_device(PORT, 1, devices.Null())
            else:
                vm.add_mmio_device(MMIO_ADDR, 4, devices.Null())

        return attach

    def python_on(space: str) -> Callable[[kvmkit.VM], None]:
        def attach(vm: kvmkit.VM) -> None:
            if space == "pio":
                vm.hook_io(PORT, 1, write=lambda addr, data: None)
            else:
                vm.hook_mmio(MMIO_ADDR, 4, write=lambda addr, data: None)

        return attach

    with tempfile.TemporaryDirectory(prefix="kvmkit-bench-") as tmp:
        workdir = Path(tmp)
        baseline, guests = build(workdir)
        cases = [
            # name, C test, guest, kvmkit attach, argument register, goal (max ratio)
            ("PIO -> Rust null device", "pio", "pio_loop", null_on("pio"), "rdx", 1.05),
            ("PIO -> Python handler", "pio", "pio_loop", python_on("pio"), "rdx", 1.3),
            ("MMIO -> Rust null device", "mmio", "mmio_loop", null_on("mmio"), "rbx", 1.05),
            ("MMIO -> Python handler", "mmio", "mmio_loop", python_on("mmio"), "rbx", 1.3),
        ]
        rows = []
        for name, test, guest, attach, register, goal in cases:
            arg = str(PORT) if test == "pio" else str(MMIO_ADDR)
            c_ns, kit_ns = [], []
            for _ in range(rounds):
                c_ns.append(c_baseline(baseline, workdir, test, guest, str(iterations), arg)["ns_per_exit"])
                kit_ns.append(kvmkit_exits(guests[guest], iterations, attach, register))
            rows.append(result_row(name, "ns/exit", c_ns, kit_ns, goal, lower_is_better=True))
            print(
                f"  {name}: C {statistics.median(c_ns):.0f}, kvmkit {statistics.median(kit_ns):.0f} ns/exit",
                flush=True,
            )
        c_rates, kit_rates = [], []
        for _ in range(rounds):
            c_rates.append(c_baseline(baseline, workdir, "churn", "halt", str(churn))["vms_per_second"])
            kit_rates.append(kvmkit_churn(guests["halt"], churn))
        rows.append(
            result_row("VM churn (2 MiB, 1 vCPU)", "VMs/s", c_rates, kit_rates, 0.7, lower_is_better=False)
        )

    print(f"{'case':28} {'unit':8} {'C floor':>10} {'kvmkit':>10} {'ratio':>7}  goal")
    for r in rows:
        print(
            f"{r['case']:28} {r['unit']:8} {r['c']:10.1f} {r['kvmkit']:10.1f} {r['ratio']:6.3f}x  "
            f"{r['goal']} {'met' if r['met'] else 'MISSED'}"
        )
    print(f"on {placement.describe()}")
    write_report(
        args.json,
        where=placement.describe(),
        iterations=iterations,
        rounds=rounds,
        churn_vms=churn,
        results=rows,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
