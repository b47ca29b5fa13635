"""Soak: many VMs created, run and dropped from several threads, with what the process holds
measured as it goes. A VM that is not freed leaves its file descriptors, a kernel thread, guest
memory and perhaps a vCPU thread behind, so a leak shows as a slope in one of those figures.

Each worker thread repeats: create a 2 MiB VM, put a small guest in it that writes to a hooked
port and halts, run it, and drop it. Every other VM is dropped without ``close()`` and has a
handler that refers to the VM itself — a reference cycle through the extension, which the
garbage collector must be able to free — and every fourth is started in the background and
stopped rather than run. After every batch the benchmark samples the process's open file
descriptors, threads and resident memory, and at the end it fits a line through the samples
(after a ``gc.collect()``, as a long-running program's collector would have run by then) and
reports each slope per 1,000 VMs, from the end of the first batch on (which warms up what a
process sets up once). The goal is flat: no descriptor or thread per 1,000 VMs, and
resident memory growing by less than 1 MiB per 1,000.

Raw guests need no hardware semantics, so this runs on any KVM.

Usage: python benchmarks/bench_soak.py [--vms N] [--threads N] [--batch N] [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import kvmkit
from report import write_report

HERE = Path(__file__).resolve().parent
PORT = 0x80
# out dx, al; hlt — with DX = PORT, in real mode at 0x1000.
GUEST = bytes([0xEE, 0xF4])
LOAD_ADDR = 0x1000
#: Per 1,000 VMs: what counts as flat.
GOALS = {"fds": 0.5, "threads": 0.5, "rss_mib": 1.0}


def held() -> dict[str, float]:
    """What the process holds now: open descriptors, threads, resident MiB."""
    rss_kib = next(
        int(line.split()[1])
        for line in Path("/proc/self/status").read_text().splitlines()
        if line.startswith("VmRSS:")
    )
    return {
        "fds": float(len(os.listdir("/proc/self/fd"))),
        "threads": float(len(os.listdir("/proc/self/task"))),
        "rss_mib": rss_kib / 1024,
    }


def one_vm(index: int) -> None:
    """Creates, runs and drops one VM; odd ones refer to themselves from a handler and are left
    to the garbage collector, every fourth runs on its own threads and is stopped."""
    cyclic = index % 2 == 1
    vm = kvmkit.VM(memory="2M")
    vm.mem_write(LOAD_ADDR, GUEST)
    cpu = vm.vcpus[0]
    cpu.setup("real", entry=LOAD_ADDR)
    cpu.reg_write("rdx", PORT)
    if cyclic:
        vm.hook_io(PORT, 1, write=lambda port, data: vm.vcpus)  # the handler holds its VM
    else:
        vm.hook_io(PORT, 1, write=lambda port, data: None)
    if index % 4 == 3:
        vm.start()
        vm.stop()
        vm.wait(timeout=30)
    else:
        exit_ = vm.run(timeout=30)
        if exit_.reason is not kvmkit.ExitReason.HLT:
            raise RuntimeError(f"soak guest {index} ended with {exit_}")
    if not cyclic:
        vm.close()


def slope_per_thousand(vms: list[float], values: list[float]) -> float:
    """Least-squares slope of ``values`` against ``vms``, per 1,000 VMs."""
    return statistics.linear_regression(vms, values).slope * 1000


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vms", type=int, default=10_000, help="VMs in all")
    parser.add_argument("--threads", type=int, default=4, help="worker threads")
    parser.add_argument("--batch", type=int, default=500, help="VMs between two samples")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "soak.json")
    args = parser.parse_args()

    counter = iter(range(args.vms))
    lock = threading.Lock()
    failures: list[Exception] = []

    def worker(limit: int) -> None:
        while True:
            with lock:
                index = next(counter, None)
            if index is None or index >= limit:
                return
            try:
                one_vm(index)
            except Exception as error:  # reported after the batch
                failures.append(error)
                return

    # The first batch warms up what a process sets up once (the extension's first VM, thread-local
    # state, allocator arenas); the line is fitted from its end on.
    samples: list[tuple[int, dict[str, float]]] = []
    started = time.perf_counter()
    for done in range(args.batch, args.vms + args.batch, args.batch):
        limit = min(done, args.vms)
        threads = [threading.Thread(target=worker, args=(limit,)) for _ in range(args.threads)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures:
            raise failures[0]
        gc.collect()
        samples.append((limit, held()))
        now = samples[-1][1]
        print(
            f"  {limit:6} VMs: {now['fds']:.0f} fds, {now['threads']:.0f} threads, "
            f"{now['rss_mib']:.1f} MiB resident",
            flush=True,
        )
    seconds = time.perf_counter() - started
    vms = [float(n) for n, _ in samples]
    rows = {}
    print(f"\n{args.vms} VMs from {args.threads} threads in {seconds:.1f} s ({args.vms / seconds:.0f} VMs/s)")
    print(f"{'held':10} {'first':>9} {'last':>9} {'per 1,000 VMs':>14}  goal")
    for key, unit in (("fds", ""), ("threads", ""), ("rss_mib", " MiB")):
        values = [sample[key] for _, sample in samples]
        slope = slope_per_thousand(vms, values)
        met = abs(slope) < GOALS[key]
        rows[key] = {"first": values[0], "last": values[-1], "slope_per_1000": slope, "met": met}
        print(
            f"{key:10} {values[0]:9.1f} {values[-1]:9.1f} {slope:+13.2f}{unit}  "
            f"|slope| < {GOALS[key]} {'met' if met else 'MISSED'}"
        )
    write_report(
        args.json,
        vms=args.vms,
        threads=args.threads,
        seconds=seconds,
        slopes=rows,
        samples=[{"vms": n, **sample} for n, sample in samples],
    )
    return 0 if all(row["met"] for row in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
