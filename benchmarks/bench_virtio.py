"""virtio device performance: kvmkit's devices driven by a driver inside a guest, against the host
doing the same I/O itself with plain system calls, in the same run.

Block: two raw images of 256 MiB (64 MiB with --quick), one read from (every 4 KiB block stamped
with its offset, which readers check) and one written to, are filled, fsynced and read back
before the first round, so both sides move data to and from the page cache, never the disk. They
are fsynced again (untimed) before each side's turn, which keeps write-back of earlier writes out
of the timings. The guest (guests/blk_bench.c, a polling driver on the virtio library of
tests/guests/c, no interrupts) keeps a fixed number of requests in flight and marks the start and
end of each job (guests/bench.h); the host stamps the marks with its clock, so a job's time is
host time from its first submission to its last completion, whatever the guest's TSC does. The
host side (io_baseline.c) issues the same requests in the same order with pread/pwrite from one
thread: the physical limit. "notify/req" is the queue notifications the device served per
request: near 1 means it had finished each request before the next arrived (the guest driver
set the pace); lower means requests queued up while it worked. "exits/req" counts exits to the
VMM per request, which stays near 0 while notifications reach the device through ioeventfds.
Where the host emulates guest instructions (kvm_pvm: every one, at 1-2 µs), the guest driver's
few hundred instructions per request, not the device, set kvmkit's pace.

Each figure is the median of rounds that alternate the two sides (and which goes first); ratios
are kvmkit / host, so higher is better. MB/s means 10^6 bytes per second.

A case is a function from a Context to result rows and settings, registered in CASES; each
brings its guest driver under guests/ (bench.h marks its phases) and a subcommand of
io_baseline.c for the host side, and compares them with alternate() and result_row().

Usage: python benchmarks/bench_virtio.py [--quick] [--only CASE] [--image-dir DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import kvmkit
from cguest import CGuest, build_guest, build_host, run_guest

HERE = Path(__file__).resolve().parent
GUESTS = HERE / "guests"
KIB, MIB = 1 << 10, 1 << 20
MEMORY_MIB = 64
PLAN_ADDR = 0x9_0000  # between the guest's stack top (0x80000) and its image (1 MiB)
BUFFERS = 32 * MIB  # BLK_MAX_DEPTH times the largest request go here, above the image

# guests/blk_jobs.h
BLK_MAX_JOBS, BLK_MAX_DEPTH = 8, 16
BLK_READ, BLK_WRITE = 0, 1
BLK_SEQUENTIAL, BLK_RANDOM = 0, 1
BLK_STAMP_STRIDE = 4096
BLK_JOB_FORMAT = "<IIIIQQ"  # struct blk_job
BLK_PLAN_FORMAT = "<QQQII"  # struct blk_plan up to its jobs
GUEST_QUEUE_SIZE = 64  # QUEUE_SIZE in guests/blk_bench.c

T = TypeVar("T")
U = TypeVar("U")


@dataclass(frozen=True)
class Context:
    """What every case gets."""

    workdir: Path  # for builds and scratch files
    image_dir: Path  # for files the devices are backed by
    baseline: Path  # the compiled io_baseline.c
    rounds: int
    quick: bool


Row = dict[str, object]
Case = Callable[[Context], tuple[list[Row], dict[str, object]]]
"""Runs one device's benchmarks: result rows (from result_row), and the settings they were
measured with, whose "summary" is printed above the table."""


def alternate(
    rounds: int, kvmkit_side: Callable[[], T], host_side: Callable[[], U]
) -> tuple[list[T], list[U]]:
    """Runs both sides ``rounds`` times, swapping which goes first each round so that a drifting
    machine (frequency, page cache, background write-back) favours neither."""
    kit, host = [], []
    for i in range(rounds):
        if i % 2 == 0:
            kit.append(kvmkit_side())
            host.append(host_side())
        else:
            host.append(host_side())
            kit.append(kvmkit_side())
    return kit, host


def result_row(case: str, unit: str, host: list[float], kit: list[float], **details: object) -> Row:
    """Medians of both sides and their ratio (higher is better for every unit here)."""
    host_median, kit_median = statistics.median(host), statistics.median(kit)
    return {
        "case": case,
        "unit": unit,
        "host": host_median,
        "kvmkit": kit_median,
        "ratio": kit_median / host_median,
        **details,
        "host_rounds": host,
        "kvmkit_rounds": kit,
    }


def filesystem_of(path: Path) -> str:
    if shutil.which("findmnt") is None:
        return "an unknown filesystem"
    proc = subprocess.run(["findmnt", "-no", "FSTYPE", "--target", str(path)], capture_output=True, text=True)
    return proc.stdout.strip() or "an unknown filesystem"


# --------------------------------------------------------------------------- block


@dataclass(frozen=True)
class BlkJob:
    """One job of guests/blk_jobs.h: ``count`` requests of ``block_size`` bytes."""

    name: str
    op: int
    pattern: int
    block_size: int
    depth: int
    count: int
    seed: int = 0x9E37_79B9_7F4A_7C15

    @property
    def total_bytes(self) -> int:
        return self.block_size * self.count

    @property
    def unit(self) -> str:
        # Small random requests are about their rate, large sequential ones about bandwidth.
        return "IOPS" if self.pattern == BLK_RANDOM else "MB/s"

    def rate(self, seconds: float) -> float:
        return self.count / seconds if self.unit == "IOPS" else self.total_bytes / seconds / 1e6

    def pack(self) -> bytes:
        return struct.pack(
            BLK_JOB_FORMAT, self.op, self.pattern, self.block_size, self.depth, self.count, self.seed
        )

    def spec(self) -> str:
        """The job as io_baseline takes it."""
        op = "read" if self.op == BLK_READ else "write"
        pattern = "seq" if self.pattern == BLK_SEQUENTIAL else "rand"
        return f"{op}:{pattern}:{self.block_size}:{self.count}:{self.seed}"


def blk_jobs(image_bytes: int, quick: bool) -> list[BlkJob]:
    """Sequential jobs make one pass over the image; random ones sample it. Enough requests in
    flight to keep the device (which serves them one after another) fed while the guest handles
    completions."""
    random_count = 1000 if quick else 5000
    jobs = [
        BlkJob("seq read 128 KiB QD8", BLK_READ, BLK_SEQUENTIAL, 128 * KIB, 8, image_bytes // (128 * KIB)),
        BlkJob("seq read 1 MiB QD4", BLK_READ, BLK_SEQUENTIAL, MIB, 4, image_bytes // MIB),
        BlkJob("seq write 128 KiB QD8", BLK_WRITE, BLK_SEQUENTIAL, 128 * KIB, 8, image_bytes // (128 * KIB)),
        BlkJob("seq write 1 MiB QD4", BLK_WRITE, BLK_SEQUENTIAL, MIB, 4, image_bytes // MIB),
        BlkJob("rand read 4 KiB QD1", BLK_READ, BLK_RANDOM, 4 * KIB, 1, random_count),
        BlkJob("rand read 4 KiB QD16", BLK_READ, BLK_RANDOM, 4 * KIB, 16, random_count),
    ]
    assert len(jobs) <= BLK_MAX_JOBS and all(job.depth <= BLK_MAX_DEPTH for job in jobs)
    assert BUFFERS + BLK_MAX_DEPTH * max(job.block_size for job in jobs) <= MEMORY_MIB * MIB
    return jobs


def make_image(path: Path, size: int) -> None:
    """Random data with every 4 KiB block stamped with its offset (what readers check), made
    durable and then read once so that it is in the page cache."""
    chunk = bytearray(os.urandom(MIB))
    with open(path, "wb") as file:
        for base in range(0, size, MIB):
            for at in range(0, MIB, BLK_STAMP_STRIDE):
                struct.pack_into("<Q", chunk, at, base + at)
            file.write(chunk)
        file.flush()
        os.fsync(file.fileno())
    with open(path, "rb", buffering=0) as file:
        while file.read(8 * MIB):
            pass


def settle(path: Path) -> None:
    """Writes back what earlier rounds wrote, outside any timing."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def blk_kvmkit(guest: CGuest, images: tuple[Path, Path], jobs: list[BlkJob]) -> list[dict[str, float]]:
    """One VM with a read-only disk on the stamped image and a disk on the scratch one; per job
    its seconds and what the disk it used counted meanwhile."""
    for image in images:
        settle(image)
    with kvmkit.VM(memory=MEMORY_MIB * MIB) as vm:
        disks = (vm.add_disk(images[BLK_READ], read_only=True), vm.add_disk(images[BLK_WRITE]))
        addresses = (disks[BLK_READ].address, disks[BLK_WRITE].address)
        plan = struct.pack(BLK_PLAN_FORMAT, *addresses, BUFFERS, len(jobs), 0)
        vm.mem_write(PLAN_ADDR, plan + b"".join(job.pack() for job in jobs))
        # VMM exits show whether queue notifications bypass the VMM (ioeventfd) as they should.
        run = run_guest(vm, guest, PLAN_ADDR, snapshot=lambda: (vm.stats, [disk.stats for disk in disks]))
        totals = [disk.stats for disk in disks]
    if run.code != len(jobs) or len(run.phases) != len(jobs):
        raise RuntimeError(f"blk_bench returned {run.code:#x} after {len(run.phases)} jobs:\n{run.text}")
    reads = sum(job.total_bytes for job in jobs if job.op == BLK_READ)
    writes = sum(job.total_bytes for job in jobs if job.op == BLK_WRITE)
    moved = [(t.errors, t.bytes_to_guest, t.bytes_from_guest) for t in totals]
    if moved != [(0, reads, 0), (0, 0, writes)]:
        raise RuntimeError(f"disk counters {totals} do not match the jobs ({reads} read, {writes} written)")
    results = []
    for job, phase in zip(jobs, run.phases):
        assert isinstance(phase.before, tuple) and isinstance(phase.after, tuple)
        (vm_before, disks_before), (vm_after, disks_after) = phase.before, phase.after
        before, after = disks_before[job.op], disks_after[job.op]
        # Less one mark's exit: whichever way the counter is taken, one falls in between.
        exits = sum(vm_after[k] - vm_before[k] for k in ("io_exits", "mmio_exits")) - 1
        results.append(
            {
                "seconds": phase.seconds,
                "requests": after.requests - before.requests,
                "notifications": after.notifications - before.notifications,
                "vmm_exits": exits,
            }
        )
    return results


def blk_host(baseline: Path, images: tuple[Path, Path], jobs: list[BlkJob]) -> list[float]:
    for image in images:
        settle(image)
    proc = subprocess.run(
        [baseline, "blk", *images, *(job.spec() for job in jobs)], check=True, capture_output=True, text=True
    )
    seconds: list[float] = json.loads(proc.stdout)["seconds"]
    return seconds


def bench_block(ctx: Context) -> tuple[list[Row], dict[str, object]]:
    guest = build_guest(GUESTS / "blk_bench.c", ctx.workdir, include=[GUESTS])
    size = (64 if ctx.quick else 256) * MIB
    jobs = blk_jobs(size, ctx.quick)
    with tempfile.TemporaryDirectory(prefix="kvmkit-bench-", dir=ctx.image_dir) as tmp:
        # Writes go to their own image so that the stamps readers check stay intact.
        images = (Path(tmp) / "read.img", Path(tmp) / "write.img")
        for image in images:
            make_image(image, size)
        kit, host = alternate(
            ctx.rounds, lambda: blk_kvmkit(guest, images, jobs), lambda: blk_host(ctx.baseline, images, jobs)
        )
        filesystem = filesystem_of(images[0])
    rows = []
    for j, job in enumerate(jobs):
        requests = [r[j]["requests"] for r in kit]
        if any(n != job.count for n in requests):
            raise RuntimeError(f"{job.name}: the disk served {requests} requests per round, want {job.count}")
        notified = [r[j]["notifications"] / job.count for r in kit]
        exits = [r[j]["vmm_exits"] / job.count for r in kit]
        rows.append(
            result_row(
                f"blk {job.name}",
                job.unit,
                [job.rate(seconds[j]) for seconds in host],
                [job.rate(r[j]["seconds"]) for r in kit],
                notifications_per_request=statistics.median(notified),
                vmm_exits_per_request=statistics.median(exits),
            )
        )
    settings: dict[str, object] = {
        "summary": (
            f"block: 2 x {size // MIB} MiB raw images on {filesystem}, in the page cache; the guest polls "
            f"a {GUEST_QUEUE_SIZE}-entry queue at the depth shown, the host does synchronous pread/pwrite"
        ),
        "image_mib": size // MIB,
        "filesystem": filesystem,
        "guest_queue_size": GUEST_QUEUE_SIZE,
        "jobs": [{"name": job.name, "spec": job.spec(), "depth": job.depth} for job in jobs],
    }
    return rows, settings


CASES: dict[str, Case] = {"block": bench_block}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a smaller image, fewer requests and rounds")
    parser.add_argument("--only", choices=sorted(CASES), action="append", help="run only this case")
    parser.add_argument(
        "--image-dir", type=Path, default=Path(tempfile.gettempdir()), help="where disk images go"
    )
    parser.add_argument("--json", type=Path, default=HERE / "results" / "virtio.json")
    args = parser.parse_args()
    rounds = 2 if args.quick else 7

    rows: list[Row] = []
    settings: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="kvmkit-bench-") as tmp:
        workdir = Path(tmp)
        baseline = build_host(HERE / "io_baseline.c", workdir / "io_baseline", include=[GUESTS])
        ctx = Context(workdir, args.image_dir, baseline, rounds, args.quick)
        for name in dict.fromkeys(args.only or CASES):
            case_rows, settings[name] = CASES[name](ctx)
            rows += case_rows

    for case_settings in settings.values():
        assert isinstance(case_settings, dict)
        print(case_settings["summary"])
    print(f"{rounds} rounds, medians; ratio = kvmkit / host (higher is better)")
    header = f"{'case':30} {'unit':5} {'host':>10} {'kvmkit':>10} {'ratio':>7}"
    print(f"{header} {'notify/req':>11} {'exits/req':>10}")
    for r in rows:
        notified, exits = r.get("notifications_per_request"), r.get("vmm_exits_per_request")
        print(
            f"{r['case']:30} {r['unit']:5} {r['host']:10.1f} {r['kvmkit']:10.1f} {r['ratio']:6.3f}x "
            f"{'-' if notified is None else format(notified, '.2f'):>11} "
            f"{'-' if exits is None else format(exits, '.3f'):>10}"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": platform.node(),
        "kernel": platform.release(),
        "kvmkit": kvmkit.__version__,
        "rounds": rounds,
        "settings": settings,
        "results": rows,
    }
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
