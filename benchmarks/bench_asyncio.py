"""Many VMs from one asyncio event loop against the same VMs run from threads, in the same run.

Each round makes ``--vms`` 2 MiB one-vCPU VMs whose guest reports ``--exits`` times on a port
served by a Python handler and then halts, and runs them all at once: from one event loop with
``run_async`` (the loop wakes on each VM's run-end eventfd), and from a thread per VM calling
``run`` (the baseline: what a program without asyncio does). It reports VMs run per second both
ways and their ratio (median of the rounds' ratios); the VMs are created before the clock starts.

Where this host's KVM is paravirtualized (``kvm_pvm``) or missing, it runs itself inside kvmkit's
nested machine (``--where`` chooses).

Usage: python benchmarks/bench_asyncio.py [--quick] [--rounds N] [--vms N] [--exits N]
       [--json PATH] [--where auto|here|nested]
"""

from __future__ import annotations

import asyncio
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import kvmkit
import placement
from kvmkit import nested
from report import write_report

HERE = Path(__file__).resolve().parent
PORT = 0x3F0
LOAD_ADDR = 0x1000


def assemble(name: str, workdir: Path) -> bytes:
    source, obj, flat = HERE / "guests" / f"{name}.S", workdir / f"{name}.o", workdir / f"{name}.bin"
    subprocess.run(["as", "--32", "-o", obj, source], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", obj, flat], check=True)
    return flat.read_bytes()


def make_vms(guest: bytes, count: int, exits: int) -> list[kvmkit.VM]:
    """VMs whose guest makes ``exits`` port writes to a Python handler, then halts."""
    vms = []
    for _ in range(count):
        vm = kvmkit.VM(memory="2M")
        vm.mem_write(LOAD_ADDR, guest)
        cpu = vm.vcpus[0]
        cpu.setup("protected", entry=LOAD_ADDR)
        cpu.reg_write("rcx", exits)
        cpu.reg_write("rdx", PORT)
        vm.hook_io(PORT, 1, write=lambda port, data: None)
        vms.append(vm)
    return vms


def from_one_loop(vms: list[kvmkit.VM]) -> None:
    async def main() -> list[kvmkit.Exit]:
        return await asyncio.gather(*(vm.run_async(timeout=120) for vm in vms))

    check(asyncio.run(main()))


def from_threads(vms: list[kvmkit.VM]) -> None:
    exits: list[kvmkit.Exit] = []
    threads = [threading.Thread(target=lambda vm=vm: exits.append(vm.run(timeout=120))) for vm in vms]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    check(exits)


def check(exits: list[kvmkit.Exit]) -> None:
    bad = [e for e in exits if e.reason is not kvmkit.ExitReason.HLT]
    if bad:
        raise RuntimeError(f"{len(bad)} VMs did not halt: {bad[0]}")


def vms_per_second(guest: bytes, count: int, exits: int, drive: Callable[[list[kvmkit.VM]], None]) -> float:
    vms = make_vms(guest, count, exits)
    try:
        started = time.perf_counter()
        drive(vms)
        return count / (time.perf_counter() - started)
    finally:
        for vm in vms:
            vm.close()


def main() -> int:
    parser = placement.parser(__doc__, "asyncio.json", "fewer VMs and rounds")
    parser.add_argument("--vms", type=int, help="VMs run at once per round")
    parser.add_argument("--exits", type=int, help="port writes each guest makes before it halts")
    args = parser.parse_args()
    status = placement.relaunch(args, __file__, cpus=2)
    if status is not None:
        return status
    defaults = (3, 50, 10) if args.quick else (5, 100, 50) if nested.inside() else (7, 200, 100)
    rounds, count, exits = args.rounds or defaults[0], args.vms or defaults[1], args.exits or defaults[2]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 16 * count)), hard))
    print(f"{rounds} rounds of {count} VMs at once, {exits} handler calls each", flush=True)
    with tempfile.TemporaryDirectory() as work:
        guest = assemble("pio_loop", Path(work))
    loop_rates, thread_rates = [], []
    for _ in range(rounds):
        loop_rates.append(vms_per_second(guest, count, exits, from_one_loop))
        thread_rates.append(vms_per_second(guest, count, exits, from_threads))
        print(f"  one loop {loop_rates[-1]:.0f} VMs/s, threads {thread_rates[-1]:.0f} VMs/s", flush=True)
    ratio = statistics.median(a / b for a, b in zip(loop_rates, thread_rates))
    loop_median, thread_median = statistics.median(loop_rates), statistics.median(thread_rates)
    print(f"one event loop: {loop_median:.0f} VMs/s; a thread per VM: {thread_median:.0f} VMs/s")
    print(f"ratio (loop / threads): {ratio:.2f}x")
    print(f"on {placement.describe()}")
    write_report(
        args.json,
        where=placement.describe(),
        rounds=rounds,
        vms=count,
        exits_per_vm=exits,
        loop_vms_per_second=loop_rates,
        thread_vms_per_second=thread_rates,
        ratio=ratio,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
