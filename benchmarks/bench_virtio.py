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

Net: frames from the guest to a reader on the host. The benchmark makes a network namespace with
two taps: the VM's card's, and a persistent one for the host side. In each, io_baseline.c's
net-read counts the frames of the benchmark's ethertype that arrive, per job, with a packet
socket. The guest (guests/net_bench.c) sends 64-byte and 1514-byte frames behind the 12-byte
virtio-net header, keeping a number of transmit chains in flight and reclaiming used ones; the
host side (net-send) writes the same frames into its tap with write(), one at a time: what a tap
takes at most. "fps" is frames sent per second, timed like block's jobs for the guest and by the
writer for the host. The "delivered" rows count only the frames the reader got, over the time
from the first send to the last of them (or to the last send, if later), and their last column
says which share of the frames sent that was (the host side's, then kvmkit's): a tap drops what a
slow reader has no room for.

Vsock: one connection between a guest listening on a port (guests/vsock_bench.c) and a host
process that connects through kvmkit's Unix socket (io_baseline.c vsock-client): round trips of
one byte, then a stream from the guest in 64 KiB packets, then one from the host that the guest
acknowledges (guests/vsock_jobs.h). The host process times each part with its own clock, so a
round trip is what a host program sees. The baseline runs the same exchange over a socketpair
between two host processes sharing one CPU (vsock-pair), where a round trip costs two context
switches, its least. kvmkit's round trip also waits for its device thread and the host process
to wake up, on whichever CPU they run: what that costs varies with the host (a lot under nested
virtualization). "µs" is per round trip; its ratio compares rates (host µs / kvmkit µs), so that
higher is better there too. The guest gives each receive buffer back as soon as it has read the
packet's header, and sends control packets and one-byte writes without waiting for the device to
take them.

Each figure is the median of rounds that alternate the two sides (and which goes first); ratios
are kvmkit / host, so higher is better. MB/s means 10^6 bytes per second.

A case is a function from a Context to result rows and settings, registered in CASES; each
brings its guest driver under guests/ (bench.h marks its phases) and a subcommand of
io_baseline.c for the host side, and compares them with alternate() and result_row().

Usage: python benchmarks/bench_virtio.py [--quick] [--only CASE] [--image-dir DIR] [--json PATH]
(net needs root: it makes a network namespace and taps.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import kvmkit
from cguest import build_guest, build_host, run_guest
from kvmkit.virtio import DeviceStats
from report import write_report
from support import CImage as CGuest
from support import in_netns, ip, network_namespace

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


def result_row(
    case: str,
    unit: str,
    host: list[float],
    kit: list[float],
    *,
    lower_is_better: bool = False,
    **details: object,
) -> Row:
    """Medians of both sides and their ratio: kvmkit / host for rates, host / kvmkit for times
    (``lower_is_better``), so that a higher ratio is better either way."""
    host_median, kit_median = statistics.median(host), statistics.median(kit)
    return {
        "case": case,
        "unit": unit,
        "host": host_median,
        "kvmkit": kit_median,
        "ratio": host_median / kit_median if lower_is_better else kit_median / host_median,
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


def device_thread_ns() -> int:
    """CPU time used so far by this process's device event-loop threads, in nanoseconds: the
    device's own cost per request, apart from the guest driver's (which the host may emulate)."""
    total = 0
    for task in Path("/proc/self/task").iterdir():
        try:
            if (task / "comm").read_text().strip() == "kvmkit-devices":
                total += int((task / "schedstat").read_text().split()[0])
        except OSError:
            continue  # a thread that just ended
    return total


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
        def snapshot() -> tuple[dict[str, int], list[DeviceStats], int]:
            return vm.stats, [disk.stats for disk in disks], device_thread_ns()

        run = run_guest(vm, guest, PLAN_ADDR, snapshot=snapshot)
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
        (vm_before, disks_before, cpu_before), (vm_after, disks_after, cpu_after) = phase.before, phase.after
        before, after = disks_before[job.op], disks_after[job.op]
        # Less one mark's exit: whichever way the counter is taken, one falls in between.
        exits = sum(vm_after[k] - vm_before[k] for k in ("io_exits", "mmio_exits")) - 1
        results.append(
            {
                "seconds": phase.seconds,
                "requests": after.requests - before.requests,
                "notifications": after.notifications - before.notifications,
                "vmm_exits": exits,
                "device_cpu_ns": cpu_after - cpu_before,
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
        # The device thread's CPU per request against the host's time per request (one system
        # call each): what kvmkit's device path costs, whatever speed the guest driver runs at.
        rows.append(
            result_row(
                f"blk {job.name} device CPU",
                "µs/req",
                [seconds[j] / job.count * 1e6 for seconds in host],
                [r[j]["device_cpu_ns"] / job.count / 1e3 for r in kit],
                lower_is_better=True,
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


# --------------------------------------------------------------------------- net

# guests/net_jobs.h
NET_MAX_JOBS = 4
NET_HDR_LEN = 12
NET_JOB_FORMAT = "<IIQ"  # struct net_job
NET_PLAN_FORMAT = "<QII"  # struct net_plan up to its jobs
NET_QUEUE_SIZE = 64  # QUEUE_SIZE in guests/net_bench.c
NET_READ_BUFFER_MIB = 8  # READ_BUFFER in io_baseline.c
GUEST_TAP, HOST_TAP = "kbench0", "kbase0"


@dataclass(frozen=True)
class NetJob:
    """One job of guests/net_jobs.h: ``count`` frames of ``frame_len`` bytes from the guest, and
    ``host_count`` of them from the host, which sends a hundred times as fast: enough for a
    timing of its own."""

    frame_len: int
    depth: int
    count: int
    host_count: int

    @property
    def name(self) -> str:
        return f"{self.frame_len} B"

    def pack(self) -> bytes:
        return struct.pack(NET_JOB_FORMAT, self.frame_len, self.depth, self.count)

    def spec(self) -> str:
        """The job as io_baseline net-send takes it."""
        return f"{self.frame_len}:{self.host_count}"


def net_jobs(quick: bool) -> list[NetJob]:
    """The smallest frame and a full one; half the guest's queue in flight."""
    count, host_count = (3000, 100_000) if quick else (15_000, 500_000)
    jobs = [NetJob(size, NET_QUEUE_SIZE // 2, count, host_count) for size in (64, 1514)]
    assert len(jobs) <= NET_MAX_JOBS
    return jobs


@contextlib.contextmanager
def tap_reader(
    baseline: Path, netns: str, interface: str, jobs: int
) -> Iterator[Callable[[], dict[str, Any]]]:
    """io_baseline net-read listening on ``interface``; the function it gives stops it (once the
    senders are done) and returns its counts."""
    proc = subprocess.Popen(
        [baseline, "net-read", f"/run/netns/{netns}", interface, str(jobs)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def stop() -> dict[str, Any]:
        out, err = proc.communicate(timeout=60)  # closing its input stops it
        if proc.returncode != 0:
            raise RuntimeError(f"net-read on {interface} failed ({proc.returncode}): {err}")
        counts: dict[str, Any] = json.loads(out)
        return counts

    try:
        assert proc.stdout is not None
        if proc.stdout.readline() != "ready\n":
            stop()
            raise RuntimeError(f"net-read on {interface} did not start")
        yield stop
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def net_result(
    j: int, job: NetJob, frames: int, start: float, end: float, counts: dict[str, Any]
) -> dict[str, float]:
    """One side's job ``j``: ``frames`` sent between ``start`` and ``end`` (time.monotonic), and
    what the reader got of them by its last one."""
    received: int = counts["frames"][j]
    return {
        "fps": frames / (end - start),
        "mb_per_s": frames * job.frame_len / (end - start) / 1e6,
        "received": received,
        "delivered": received / frames,
        "delivered_fps": received / (max(end, counts["last"][j]) - start),
        "reader_drops": counts["drops"],  # the kernel's count, for all jobs of the run
    }


def net_kvmkit(baseline: Path, guest: CGuest, netns: str, jobs: list[NetJob]) -> list[dict[str, float]]:
    """One VM whose card is on a new tap in ``netns``; per job its results and the card's
    counters."""
    with kvmkit.VM(memory=MEMORY_MIB * MIB) as vm:
        net = in_netns(netns, lambda: vm.add_net(GUEST_TAP))
        ip(netns, "link", "set", GUEST_TAP, "up")
        plan = struct.pack(NET_PLAN_FORMAT, net.address, len(jobs), 0)
        vm.mem_write(PLAN_ADDR, plan + b"".join(job.pack() for job in jobs))
        with tap_reader(baseline, netns, GUEST_TAP, len(jobs)) as stop:
            # The clock net-read stamps frames with, for the delivered rate.
            run = run_guest(vm, guest, PLAN_ADDR, snapshot=lambda: (time.monotonic(), vm.stats, net.stats))
            counts = stop()
        total = net.stats
    if run.code != len(jobs) or len(run.phases) != len(jobs):
        raise RuntimeError(f"net_bench returned {run.code:#x} after {len(run.phases)} jobs:\n{run.text}")
    sent = sum((NET_HDR_LEN + job.frame_len) * job.count for job in jobs)
    if (total.errors, total.requests, total.bytes_from_guest) != (0, sum(j.count for j in jobs), sent):
        raise RuntimeError(f"card counters {total} do not match the jobs ({sent} bytes sent)")
    results = []
    for j, (job, phase) in enumerate(zip(jobs, run.phases)):
        assert isinstance(phase.before, tuple) and isinstance(phase.after, tuple)
        (start, vm_before, before), (end, vm_after, after) = phase.before, phase.after
        if after.requests - before.requests != job.count:
            raise RuntimeError(f"net {job.name}: the card sent {after.requests - before.requests} frames")
        result = net_result(j, job, job.count, start, end, counts)
        result["notifications"] = after.notifications - before.notifications
        # Less one mark's exit, as for block.
        result["vmm_exits"] = sum(vm_after[k] - vm_before[k] for k in ("io_exits", "mmio_exits")) - 1
        results.append(result)
    return results


def net_host(baseline: Path, netns: str, jobs: list[NetJob]) -> list[dict[str, float]]:
    with tap_reader(baseline, netns, HOST_TAP, len(jobs)) as stop:
        proc = subprocess.run(
            [baseline, "net-send", f"/run/netns/{netns}", HOST_TAP, *(job.spec() for job in jobs)],
            capture_output=True,
            text=True,
        )
        counts = stop()
    if proc.returncode != 0:
        raise RuntimeError(f"net-send failed ({proc.returncode}): {proc.stderr}")
    times = json.loads(proc.stdout)
    return [
        net_result(j, job, job.host_count, times["start"][j], times["end"][j], counts)
        for j, job in enumerate(jobs)
    ]


def bench_net(ctx: Context) -> tuple[list[Row], dict[str, object]]:
    if shutil.which("ip") is None:
        raise RuntimeError("the net case needs iproute2's ip")
    clock = time.get_clock_info("monotonic").implementation
    if "CLOCK_MONOTONIC" not in clock:
        raise RuntimeError(f"time.monotonic() is {clock}, not the CLOCK_MONOTONIC that net-read uses")
    guest = build_guest(GUESTS / "net_bench.c", ctx.workdir, include=[GUESTS])
    jobs = net_jobs(ctx.quick)
    with network_namespace("kvmkit-bench") as netns:
        ip(netns, "tuntap", "add", "dev", HOST_TAP, "mode", "tap")
        ip(netns, "link", "set", HOST_TAP, "up")
        kit, host = alternate(
            ctx.rounds,
            lambda: net_kvmkit(ctx.baseline, guest, netns, jobs),
            lambda: net_host(ctx.baseline, netns, jobs),
        )

    rows = []
    for j, job in enumerate(jobs):

        def both(key: str, j: int = j) -> tuple[list[float], list[float]]:
            return [r[j][key] for r in host], [r[j][key] for r in kit]

        rows += [
            result_row(
                f"net tx {job.name}",
                "fps",
                *both("fps"),
                notifications_per_request=statistics.median(r[j]["notifications"] / job.count for r in kit),
                vmm_exits_per_request=statistics.median(r[j]["vmm_exits"] / job.count for r in kit),
            ),
            result_row(f"net tx {job.name}", "MB/s", *both("mb_per_s")),
            result_row(
                f"net tx {job.name} delivered",
                "fps",
                *both("delivered_fps"),
                delivered_host=statistics.median(both("delivered")[0]),
                delivered_kvmkit=statistics.median(both("delivered")[1]),
                received_host=both("received")[0],
                received_kvmkit=both("received")[1],
                reader_drops_host=both("reader_drops")[0],
                reader_drops_kvmkit=both("reader_drops")[1],
            ),
        ]
    settings: dict[str, object] = {
        "summary": (
            f"net: {jobs[0].count} frames per size from the guest ({jobs[0].depth} chains of a "
            f"{NET_QUEUE_SIZE}-entry queue in flight), {jobs[0].host_count} written to a tap by the host; "
            f"a packet socket with {NET_READ_BUFFER_MIB} MiB of buffer counts them "
            "(delivered: host / kvmkit share of the frames sent)"
        ),
        "jobs": [
            {
                "name": job.name,
                "frame_bytes": job.frame_len,
                "depth": job.depth,
                "count": job.count,
                "host_count": job.host_count,
            }
            for job in jobs
        ],
        "guest_queue_size": NET_QUEUE_SIZE,
        "reader_buffer_mib": NET_READ_BUFFER_MIB,
    }
    return rows, settings


# --------------------------------------------------------------------------- vsock

VSOCK_PLAN_FORMAT = "<QQIIQII"  # struct vsock_plan in guests/vsock_jobs.h
VSOCK_BUFFER_BYTES = 2 * MIB  # VSOCK_BUFFER_BYTES there
VSOCK_PACKET = 64 * KIB
VSOCK_CID, VSOCK_PORT = 42, 5201
VSOCK_PHASES = ("round trip", "guest to host", "host to guest")  # the guest's phases 0 to 2
VSOCK_KEYS = ("round_trip", "to_host", "from_host")  # io_baseline's names for their times


@dataclass(frozen=True)
class VsockExchange:
    """guests/vsock_jobs.h's exchange: round trips, then ``stream_bytes`` each way."""

    round_trips: int
    stream_bytes: int
    packet_bytes: int = VSOCK_PACKET

    def args(self) -> list[str]:
        return [str(self.round_trips), str(self.stream_bytes), str(self.packet_bytes)]


def parse_exchange_times(stdout: str) -> dict[str, float]:
    times = json.loads(stdout)
    return {key: float(times[key]) for key in VSOCK_KEYS}


def vsock_kvmkit(baseline: Path, guest: CGuest, socket_path: Path, x: VsockExchange) -> dict[str, Any]:
    """One VM listening on a vsock port and io_baseline's host end connecting to it: the host
    end's times, and per phase what the device counted."""
    assert BUFFERS + VSOCK_BUFFER_BYTES <= MEMORY_MIB * MIB
    with kvmkit.VM(memory=MEMORY_MIB * MIB) as vm:
        vsock = vm.add_vsock(VSOCK_CID, socket_path)
        plan = struct.pack(
            VSOCK_PLAN_FORMAT,
            vsock.address,
            BUFFERS,
            VSOCK_PORT,
            x.round_trips,
            x.stream_bytes,
            x.packet_bytes,
            0,
        )
        vm.mem_write(PLAN_ADDR, plan)
        client = subprocess.Popen(
            [baseline, "vsock-client", socket_path, str(VSOCK_PORT), *x.args()],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            run = run_guest(vm, guest, PLAN_ADDR, snapshot=lambda: (vm.stats, vsock.stats))
            out, err = client.communicate(timeout=60)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
        total = vsock.stats
    if run.code != len(VSOCK_PHASES) or len(run.phases) != len(VSOCK_PHASES):
        raise RuntimeError(f"vsock_bench returned {run.code:#x} after {len(run.phases)} phases:\n{run.text}")
    if client.returncode != 0:
        raise RuntimeError(f"vsock-client failed ({client.returncode}): {err}")
    if total.errors:
        raise RuntimeError(f"the vsock device counted {total.errors} errors")
    phases = []
    for phase in run.phases:
        assert isinstance(phase.before, tuple) and isinstance(phase.after, tuple)
        (vm_before, before), (vm_after, after) = phase.before, phase.after
        phases.append(
            {
                "packets": after.requests - before.requests,
                "notifications": after.notifications - before.notifications,
                "vmm_exits": sum(vm_after[k] - vm_before[k] for k in ("io_exits", "mmio_exits")) - 1,
            }
        )
    return {"seconds": parse_exchange_times(out), "phases": phases}


def vsock_host(baseline: Path, x: VsockExchange) -> dict[str, float]:
    proc = subprocess.run([baseline, "vsock-pair", *x.args()], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"vsock-pair failed ({proc.returncode}): {proc.stderr}")
    return parse_exchange_times(proc.stdout)


def bench_vsock(ctx: Context) -> tuple[list[Row], dict[str, object]]:
    guest = build_guest(GUESTS / "vsock_bench.c", ctx.workdir, include=[GUESTS])
    x = VsockExchange(round_trips=300 if ctx.quick else 2000, stream_bytes=(16 if ctx.quick else 64) * MIB)
    socket_path = ctx.workdir / "vsock"  # the device removes it when the VM closes
    kit, host = alternate(
        ctx.rounds,
        lambda: vsock_kvmkit(ctx.baseline, guest, socket_path, x),
        lambda: vsock_host(ctx.baseline, x),
    )
    rows = []
    for p, (phase, key) in enumerate(zip(VSOCK_PHASES, VSOCK_KEYS)):
        counted = [r["phases"][p] for r in kit]
        host_s, kit_s = [r[key] for r in host], [r["seconds"][key] for r in kit]
        round_trip = key == "round_trip"
        rows.append(
            result_row(
                f"vsock {phase}" + (" 1 B" if round_trip else f" {x.packet_bytes // KIB} KiB"),
                "µs" if round_trip else "MB/s",
                [t * 1e6 if round_trip else x.stream_bytes / t / 1e6 for t in host_s],
                [t * 1e6 if round_trip else x.stream_bytes / t / 1e6 for t in kit_s],
                lower_is_better=round_trip,
                notifications_per_request=statistics.median(
                    c["notifications"] / c["packets"] for c in counted
                ),
                vmm_exits_per_request=statistics.median(c["vmm_exits"] / c["packets"] for c in counted),
                packets=statistics.median(c["packets"] for c in counted),
            )
        )
    settings: dict[str, object] = {
        "summary": (
            f"vsock: {x.round_trips} round trips of 1 byte, then {x.stream_bytes // MIB} MiB each way in "
            f"{x.packet_bytes // KIB} KiB writes, timed by the host end; host = a socketpair between two "
            "processes on one CPU"
        ),
        "round_trips": x.round_trips,
        "stream_mib": x.stream_bytes // MIB,
        "packet_kib": x.packet_bytes // KIB,
    }
    return rows, settings


CASES: dict[str, Case] = {"block": bench_block, "net": bench_net, "vsock": bench_vsock}


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
    print(f"{rounds} rounds, medians; ratio = kvmkit / host (higher is better; for µs, of the rates)")
    header = f"{'case':38} {'unit':6} {'host':>10} {'kvmkit':>10} {'ratio':>7}"
    print(f"{header} {'notify/req':>11} {'exits/req':>10} {'delivered':>13}")
    for r in rows:
        notified, exits = r.get("notifications_per_request"), r.get("vmm_exits_per_request")
        delivered = f"{r['delivered_host']:.1%}/{r['delivered_kvmkit']:.1%}" if "delivered_host" in r else "-"
        print(
            f"{r['case']:38} {r['unit']:6} {r['host']:10.1f} {r['kvmkit']:10.1f} {r['ratio']:6.3f}x "
            f"{'-' if notified is None else format(notified, '.2f'):>11} "
            f"{'-' if exits is None else format(exits, '.3f'):>10} {delivered:>13}"
        )
    write_report(args.json, rounds=rounds, settings=settings, results=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
