"""Debugging: the single-step rate and a breakpoint hit's trip to a Python callback, each against
a floor measured in the same run, in alternating rounds.

- Single-step: ``vm.run(count=N)`` on ``guests/step_loop.S`` (an endless ``inc``/``jmp`` loop),
  steps per second, against ``baseline.c step``: the same guest and N ``KVM_RUN`` calls with
  ``KVM_GUESTDBG_SINGLESTEP``, each ending in ``KVM_EXIT_DEBUG``. Goal: 0.9x the floor's rate or
  more. A loop of ``cpu.step()`` calls from Python is reported beside it.
- Breakpoint to Python and back: a hardware breakpoint on the loop's first instruction and a
  ``vm.on_debug`` callback that continues the run until the Nth hit; time per hit, against one
  exit round trip in C (``baseline.c pio``: a port write the loop makes and ``KVM_RUN`` again).

Where this host's KVM is paravirtualized (``kvm_pvm``) or missing, it runs itself inside kvmkit's
nested machine (``--where`` chooses).

Usage: python benchmarks/bench_debug.py [--quick] [--rounds N] [--steps N] [--hits N]
       [--json PATH] [--where auto|here|nested]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import kvmkit
import placement
from bench_exits import PORT, build, c_baseline, result_row
from kvmkit import nested
from report import write_report

LOAD_ADDR = 0x1000


def loop_vm(guest: bytes) -> kvmkit.VM:
    vm = kvmkit.VM(memory="2M")
    vm.mem_write(LOAD_ADDR, guest)
    vm.vcpus[0].setup("protected", entry=LOAD_ADDR)
    return vm


def kvmkit_steps(guest: bytes, steps: int) -> float:
    """Steps per second of ``run(count=steps)``."""
    with loop_vm(guest) as vm:
        vm.run(count=1)
        started = time.perf_counter()
        exit_ = vm.run(count=steps)
        elapsed = time.perf_counter() - started
        if exit_.details.get("kind") != "step" or vm.vcpus[0].reg_read("eax") < steps // 2:
            raise RuntimeError(f"the step loop misbehaved: {exit_}")
        return steps / elapsed


def python_steps(guest: bytes, steps: int) -> float:
    """Steps per second of a Python loop of ``cpu.step()``."""
    with loop_vm(guest) as vm:
        step = vm.vcpus[0].step
        step()
        started = time.perf_counter()
        for _ in range(steps):
            step()
        return steps / (time.perf_counter() - started)


def breakpoint_hits(guest: bytes, hits: int) -> float:
    """ns per breakpoint hit that reaches a Python callback which continues the run."""
    with loop_vm(guest) as vm:
        vm.add_breakpoint(LOAD_ADDR, hardware=True)
        seen = 0

        def on_debug(cpu: kvmkit.Vcpu, event: kvmkit.Exit) -> bool:
            nonlocal seen
            seen += 1
            return seen < hits

        vm.on_debug(on_debug)
        vm.run(timeout=60)  # the first hit, untimed
        seen = 0
        started = time.perf_counter()
        exit_ = vm.run(timeout=600)
        elapsed = time.perf_counter() - started
        if seen != hits or exit_.details.get("kind") != "breakpoint":
            raise RuntimeError(f"breakpoint loop misbehaved after {seen} hits: {exit_}")
        return elapsed / hits * 1e9


def main() -> int:
    parser = placement.parser(__doc__, "debug.json", "fewer steps, hits and rounds")
    parser.add_argument("--steps", type=int, help="single steps per round")
    parser.add_argument("--hits", type=int, help="breakpoint hits per round")
    args = parser.parse_args()
    status = placement.relaunch(args, __file__, cpus=1)
    if status is not None:
        return status
    steps = args.steps or (2000 if args.quick else 20000)
    hits = args.hits or (200 if args.quick else 2000)
    rounds = args.rounds or (2 if args.quick else 7)
    print(f"{rounds} rounds: {steps} steps, {hits} breakpoint hits, on {placement.describe()}", flush=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kvmkit-bench-") as tmp:
        workdir = Path(tmp)
        baseline, guests = build(workdir)
        loop = guests["step_loop"]
        c_rates, kit_rates, py_rates = [], [], []
        for _ in range(rounds):
            c_rates.append(
                1e9 / c_baseline(baseline, workdir, "step", "step_loop", str(steps))["ns_per_step"]
            )
            kit_rates.append(kvmkit_steps(loop, steps))
            py_rates.append(python_steps(loop, max(steps // 10, 100)))
        row = result_row(
            "single-step, run(count=N)", "steps/s", c_rates, kit_rates, 0.9, lower_is_better=False
        )
        rows.append(row)
        step_row = result_row(
            "single-step, cpu.step()", "steps/s", c_rates, py_rates, None, lower_is_better=False
        )
        rows.append(step_row)
        print(f"  steps/s: C {row['c']:.0f}, run(count) {row['kvmkit']:.0f}, step() {step_row['kvmkit']:.0f}")
        c_ns, hit_ns = [], []
        if nested.inside():
            # The nested machine's emulated SVM raises no hardware breakpoints.
            print("  breakpoint: not measured in the nested machine (no hardware breakpoints there)")
            rounds_for_hits = 0
        else:
            rounds_for_hits = rounds
        for _ in range(rounds_for_hits):
            c_ns.append(c_baseline(baseline, workdir, "pio", "pio_loop", str(hits), str(PORT))["ns_per_exit"])
            hit_ns.append(breakpoint_hits(loop, hits))
        if hit_ns:
            rows.append(
                result_row(
                    "breakpoint -> Python callback", "ns/hit", c_ns, hit_ns, None, lower_is_better=True
                )
            )
            c_exit, kit_hit = statistics.median(c_ns), statistics.median(hit_ns)
            print(f"  breakpoint: C exit {c_exit:.0f} ns, kvmkit hit {kit_hit:.0f} ns")
    print(f"{'case':32} {'unit':8} {'C floor':>10} {'kvmkit':>10} {'ratio':>8}  goal")
    for r in rows:
        goal = "" if r["goal"] is None else f"{r['goal']} {'met' if r['met'] else 'MISSED'}"
        print(f"{r['case']:32} {r['unit']:8} {r['c']:10.0f} {r['kvmkit']:10.0f} {r['ratio']:7.3f}x  {goal}")
    print(f"on {placement.describe()}")
    write_report(args.json, where=placement.describe(), steps=steps, hits=hits, rounds=rounds, results=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
