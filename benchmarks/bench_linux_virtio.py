"""virtio from a Linux guest: kvmkit against QEMU's microvm, both booting the default guest's
kernel, initramfs and command line with the same devices on virtio-mmio, measured from inside the
guest by the same program.

Devices (one of each, on both VMMs):

- block: a raw image of 256 MiB (64 MiB with --quick) on the machine's /tmp, in the page cache
  (tmpfs inside the nested machine); QEMU: ``virtio-blk-device`` on ``-drive
  format=raw,cache=writeback`` (its defaults: thread-pool AIO);
- network: a tap in a network namespace the benchmark makes, whose host end has an address and
  a TCP sink; QEMU: ``virtio-net-device`` on ``-netdev tap,vhost=on`` (the kernel's vhost-net);
- vsock: guest CID 3; kvmkit's host side is its Unix socket (a listener at ``<uds_path>_<port>``),
  QEMU's is ``vhost-vsock-device`` (the kernel's vhost-vsock) with an AF_VSOCK listener.

The guest program (guests/linux_iobench.c, compiled with ``cc -static -O2``) reaches the guest
in a small cpio archive appended to the default initramfs (Linux unpacks concatenated archives).
It is driven through the serial console on both VMMs and times each case inside the guest with
clock_gettime: sequential O_DIRECT reads and writes of 1 MiB on /dev/vda (MB/s), random 4 KiB
O_DIRECT reads one at a time from 1 and from 4 threads (IOPS), a TCP stream to the tap's host end
and a vsock stream to the host (CID 2), each until the host-side sink (the same program) has
counted every byte (MB/s).

Every round boots each VMM once and runs every case on it; rounds alternate which VMM goes first.
The table gives medians, the ratio kvmkit / QEMU of the medians (higher is better for kvmkit), and
the spread of each side's rounds ((max - min) / median) as a measure of the machine's noise.

It needs a KVM with hardware semantics: where this host's KVM is paravirtualized (``kvm_pvm``) or
missing, the benchmark runs itself inside kvmkit's nested machine (``kvmkit.nested``; ``--where``
chooses), after building the default guest here (the nested machine's cache is read-only).

Usage: python benchmarks/bench_linux_virtio.py [--rounds N] [--quick] [--where auto|here|nested]
       [--json PATH]  (root: it makes a network namespace and taps)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import kvmkit
import placement
from kvmkit._core import Initramfs
from kvmkit.errors import ConsoleTimeout
from kvmkit.images import READY_MARKER, GuestImage, default_guest
from kvmkit.virtio import DeviceStats
from report import write_report

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from support import in_netns, ip, network_namespace

HERE = Path(__file__).resolve().parent
TOOL_SOURCE = HERE / "guests" / "linux_iobench.c"
TOOL_IN_GUEST = "usr/bin/kvmkit-iobench"
MIB = 1 << 20
MEMORY = "256M"
GUEST_CID = 3
TCP_PORT, VSOCK_PORT = 5201, 5202
HOST_ADDR, GUEST_ADDR = "10.77.0.1", "10.77.0.2"
TAPS = {"kvmkit": "kvtap0", "qemu": "qmtap0"}
SIDES = ("kvmkit", "qemu")
#: Seconds a case may take (everything runs about 15 times slower in the nested machine).
CASE_TIMEOUT = 300.0
BOOT_TIMEOUT = 180.0
#: Tries per VM run (see attempt()).
ATTEMPTS = 3
#: A whole line of the program's output (the console may show a line before its end has come).
RESULT = re.compile(rb"IOBENCH-(RESULT|ERROR) ([^\r\n]*)\r?\n")


@dataclass(frozen=True)
class Case:
    name: str
    device: str  # "block", "net" or "vsock"
    args: tuple[str, ...]  # after the program's name
    unit: str


def cases(image_mib: int, quick: bool) -> list[Case]:
    stream_mib = 64 if quick else 256
    random_reads = 1000 if quick else 4000
    return [
        Case("seq read 1 MiB", "block", ("seqread", "/dev/vda", str(MIB), str(image_mib)), "MB/s"),
        Case("seq write 1 MiB", "block", ("seqwrite", "/dev/vda", str(MIB), str(image_mib)), "MB/s"),
        Case(
            "rand read 4 KiB QD1", "block", ("randread", "/dev/vda", "4096", str(random_reads), "1"), "IOPS"
        ),
        Case(
            "rand read 4 KiB 4 threads",
            "block",
            ("randread", "/dev/vda", "4096", str(random_reads), "4"),
            "IOPS",
        ),
        Case("net tcp guest->host", "net", ("tcp", HOST_ADDR, str(TCP_PORT), str(stream_mib)), "MB/s"),
        Case("vsock guest->host", "vsock", ("vsock", "2", str(VSOCK_PORT), str(stream_mib)), "MB/s"),
    ]


# --------------------------------------------------------------------------- consoles


class Console(Protocol):
    def sendline(self, line: str) -> None: ...

    def expect(self, pattern: bytes, timeout: float) -> re.Match[bytes]: ...


class PipeConsole:
    """QEMU's serial console on its stdin and stdout, with kvmkit's console's expect()."""

    def __init__(self, process: subprocess.Popen[bytes], log: Path | None) -> None:
        self.process = process
        self.log = None if log is None else open(log, "wb")  # noqa: SIM115 (closed by the reader)
        self.buffer = bytearray()
        self.cursor = 0
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        while chunk := os.read(fd, 65536):
            with self.changed:
                self.buffer += chunk
                self.changed.notify_all()
            if self.log is not None:
                self.log.write(chunk)
                self.log.flush()
        if self.log is not None:
            self.log.close()
        with self.changed:
            self.changed.notify_all()

    def sendline(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")
        self.process.stdin.flush()

    def expect(self, pattern: bytes, timeout: float) -> re.Match[bytes]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                match = regex.search(bytes(self.buffer), self.cursor)
                if match is not None:
                    self.cursor = match.end()
                    return match
                left = deadline - time.monotonic()
                if left <= 0 or (self.process.poll() is not None and not self.reader.is_alive()):
                    tail = bytes(self.buffer[-1500:]).decode(errors="replace")
                    raise TimeoutError(f"QEMU's console did not show {pattern!r}; last output:\n{tail}")
                self.changed.wait(min(left, 0.5))


# --------------------------------------------------------------------------- host side


def build_tool(workdir: Path) -> Path:
    tool = workdir / "kvmkit-iobench"
    command = ["cc", "-static", "-O2", "-Wall", "-o", str(tool), str(TOOL_SOURCE), "-lpthread"]
    subprocess.run(command, check=True)
    return tool


def guest_initrd(guest: GuestImage, tool: Path, workdir: Path) -> Path:
    """The default initramfs with a second archive appended that adds the benchmark program."""
    base = guest.initrd.read_bytes()
    base += b"\0" * (-len(base) % 512)  # the next archive starts 4-byte aligned; zeros are skipped
    extra = Initramfs()
    extra.add_file(TOOL_IN_GUEST, tool.read_bytes(), 0o755)
    path = workdir / "initrd-iobench.cpio"
    path.write_bytes(base + extra.finish())
    return path


def make_image(path: Path, size: int) -> None:
    chunk = os.urandom(MIB)
    with open(path, "wb") as file:
        for _ in range(size // MIB):
            file.write(chunk)


@contextmanager
def sink(command: list[str]) -> Iterator[None]:
    """The benchmark program's sink, listening until the block ends."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if b"IOBENCH-SINK ready" not in line:
            raise RuntimeError(f"{' '.join(command)} did not start: {line.decode(errors='replace')}")
        yield
    finally:
        process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()


def address_tap(netns: str, tap: str, timeout: float = 30.0) -> None:
    """Gives the host end of ``tap`` its address once the VMM has made the tap."""
    deadline = time.monotonic() + timeout
    while subprocess.run(["ip", "-n", netns, "link", "show", tap], capture_output=True).returncode != 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no tap {tap} in {netns}")
        time.sleep(0.1)
    ip(netns, "addr", "add", f"{HOST_ADDR}/24", "dev", tap)
    ip(netns, "link", "set", tap, "up")


#: kvmkit's device counters by device kind, taken before and after each case.
Counters = Callable[[], dict[str, DeviceStats]]


def run_cases(
    console: Console, the_cases: list[Case], counters: Counters | None = None
) -> tuple[dict[str, float], dict[str, dict[str, int]]]:
    """Runs each case in the guest's shell: its figure by name, and with ``counters`` what its
    device counted meanwhile (requests, interrupts, notifications)."""
    console.expect(READY_MARKER.encode(), BOOT_TIMEOUT)
    program = "/" + TOOL_IN_GUEST
    console.sendline(f"ip addr add {GUEST_ADDR}/24 dev eth0 && ip link set eth0 up && echo net-up")
    console.expect(rb"\nnet-up", 60)
    # Warm-ups, untimed: ARP, the first connections.
    for warm in (("tcp", HOST_ADDR, str(TCP_PORT), "4"), ("vsock", "2", str(VSOCK_PORT), "4")):
        for _attempt in range(10):
            console.sendline(f"{program} {' '.join(warm)}")
            kind, text = console.expect(RESULT.pattern, CASE_TIMEOUT).groups()
            if kind == b"RESULT":
                break
            time.sleep(1)
        else:
            raise RuntimeError(f"{warm[0]} from the guest fails: {text.decode(errors='replace')}")
    figures, counts = {}, {}
    for case in the_cases:
        before = counters() if counters is not None else {}
        console.sendline(f"{program} {' '.join(case.args)}")
        kind, text = console.expect(RESULT.pattern, CASE_TIMEOUT).groups()
        if kind != b"RESULT":
            raise RuntimeError(f"{case.name}: {text.decode(errors='replace')}")
        figures[case.name] = float(text.split()[1])
        if counters is not None:
            old, new = before[case.device], counters()[case.device]
            counts[case.name] = {
                key: getattr(new, key) - getattr(old, key)
                for key in ("requests", "interrupts", "notifications")
            }
    return figures, counts


@dataclass(frozen=True)
class Setup:
    guest: GuestImage
    initrd: Path
    image: Path
    tool: Path
    netns: str
    workdir: Path
    cases: list[Case]
    logs: Path | None  # where each VM's console goes, if anywhere

    def log(self, side: str) -> Path | None:
        if self.logs is None:
            return None
        self.logs.mkdir(parents=True, exist_ok=True)
        return self.logs / f"{side}-{time.strftime('%H%M%S')}.log"


Outcome = tuple[dict[str, float], dict[str, dict[str, int]]]


def run_kvmkit(s: Setup) -> Outcome:
    uds = Path(tempfile.mkdtemp(dir=s.workdir)) / "vsock"
    with kvmkit.VM(memory=MEMORY, cpus=1, irqchip=True, pit=True) as vm:
        disk = vm.add_disk(s.image)
        net = in_netns(s.netns, lambda: vm.add_net(TAPS["kvmkit"]))
        address_tap(s.netns, TAPS["kvmkit"])
        vsock = vm.add_vsock(GUEST_CID, uds)
        devices = {"block": disk, "net": net, "vsock": vsock}
        console = vm.boot_linux(s.guest.vmlinux, initrd=s.initrd, cmdline=s.guest.cmdline)
        log = s.log("kvmkit")
        if log is not None:
            console.log_to(log)
        tcp_sink = ["ip", "netns", "exec", s.netns, str(s.tool), "sink", "tcp", str(TCP_PORT)]
        with sink(tcp_sink), sink([str(s.tool), "sink", "unix", f"{uds}_{VSOCK_PORT}"]):
            vm.start()
            try:
                return run_cases(console, s.cases, lambda: {k: d.stats for k, d in devices.items()})
            finally:
                vm.stop()
                vm.wait(timeout=30)


def qemu_command(s: Setup) -> list[str]:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise RuntimeError("QEMU is not installed (Debian: apt-get install qemu-system-x86)")
    return [
        "ip", "netns", "exec", s.netns,
        qemu, "-M", "microvm,x-option-roms=off,rtc=on", "-enable-kvm", "-cpu", "host",
        "-m", MEMORY, "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none",
        "-serial", "stdio",
        "-kernel", str(s.guest.vmlinux), "-initrd", str(s.initrd), "-append", s.guest.cmdline,
        "-drive", f"id=disk0,file={s.image},format=raw,if=none,cache=writeback",
        "-device", "virtio-blk-device,drive=disk0",
        "-netdev", f"tap,id=net0,ifname={TAPS['qemu']},script=no,downscript=no,vhost=on",
        "-device", "virtio-net-device,netdev=net0",
        "-device", f"vhost-vsock-device,guest-cid={GUEST_CID}",
    ]  # fmt: skip


def run_qemu(s: Setup) -> Outcome:
    tcp_sink = ["ip", "netns", "exec", s.netns, str(s.tool), "sink", "tcp", str(TCP_PORT)]
    with sink(tcp_sink), sink([str(s.tool), "sink", "vsock", str(VSOCK_PORT)]):
        process = subprocess.Popen(
            qemu_command(s), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            console = PipeConsole(process, s.log("qemu"))
            address_tap(s.netns, TAPS["qemu"])
            return run_cases(console, s.cases)
        finally:
            process.kill()
            process.wait()
            for stream in (process.stdin, process.stdout):
                if stream is not None:
                    stream.close()


# --------------------------------------------------------------------------- report


def spread(values: list[float]) -> float:
    return (max(values) - min(values)) / statistics.median(values) if values else 0.0


def attempt(side: str, setup: Setup, failures: list[dict[str, str]]) -> Outcome | None:
    """One VM's run of every case, tried again (up to ATTEMPTS times) when the guest does not
    get through: under the nested machine's emulated SVM a guest kernel now and then crashes
    while it boots, whichever VMM runs it. Each failure is kept for the report; None when every
    attempt failed."""
    for number in range(1, ATTEMPTS + 1):
        try:
            return run_kvmkit(setup) if side == "kvmkit" else run_qemu(setup)
        except (TimeoutError, RuntimeError, ConsoleTimeout) as error:
            why = str(error).strip().splitlines()
            failures.append({"side": side, "error": "\n".join(why[:1] + why[-12:])})
            print(f"  {side} attempt {number} failed: {why[0] if why else error!r}", flush=True)
    return None


def run_here(args: argparse.Namespace) -> int:
    guest = default_guest()
    where = placement.describe()
    image_mib = 64 if args.quick else 256
    with (
        tempfile.TemporaryDirectory(prefix="kvmkit-linux-virtio-") as tmp,
        network_namespace("kvmkit-lv") as ns,
    ):
        workdir = Path(tmp)
        tool = build_tool(workdir)
        image = workdir / "disk.img"
        make_image(image, image_mib * MIB)
        setup = Setup(
            guest,
            guest_initrd(guest, tool, workdir),
            image,
            tool,
            ns,
            workdir,
            cases(image_mib, args.quick),
            args.logs,
        )
        print(
            f"kernel {guest.kernel_version}, {MEMORY}, 1 vCPU, {image_mib} MiB image, on {where}; "
            f"{args.rounds} rounds",
            flush=True,
        )
        rounds: dict[str, list[dict[str, float]]] = {side: [] for side in SIDES}
        device_counts: list[dict[str, dict[str, int]]] = []  # kvmkit's, per round
        failures: list[dict[str, str]] = []
        for round_ in range(args.rounds):
            order = SIDES if round_ % 2 == 0 else SIDES[::-1]
            outcomes: dict[str, Outcome] = {}
            for side in order:
                started = time.monotonic()
                outcome = attempt(side, setup, failures)
                if outcome is None:
                    break
                outcomes[side] = outcome
                shown = ", ".join(f"{name} {value:.0f}" for name, value in outcome[0].items())
                print(
                    f"  round {round_ + 1} {side} ({time.monotonic() - started:.0f} s): {shown}", flush=True
                )
            if len(outcomes) < len(SIDES):
                # Both sides or neither, so that each side's medians come from the same rounds.
                print(f"  round {round_ + 1} dropped: {side} failed {ATTEMPTS} times", flush=True)
                continue
            for side, (figures, counts) in outcomes.items():
                rounds[side].append(figures)
                if side == "kvmkit":
                    device_counts.append(counts)
        if not device_counts:
            raise RuntimeError(f"no round completed; the failures: {failures}")

    rows = []
    completed = len(device_counts)
    print(f"\nmedians of {completed} alternating rounds, measured in the guest, on {where}")
    print(
        f"{'case':28} {'unit':5} {'kvmkit':>9} {'QEMU':>9} {'ratio':>6}  {'spread kvmkit/QEMU':>18}"
        "  kvmkit irq/req notify/req"
    )
    for case in setup.cases:
        kit = [r[case.name] for r in rounds["kvmkit"]]
        qemu = [r[case.name] for r in rounds["qemu"]]
        k, q = statistics.median(kit), statistics.median(qemu)
        per_request = {
            key: statistics.median(
                c[case.name][key] / max(c[case.name]["requests"], 1) for c in device_counts
            )
            for key in ("interrupts", "notifications")
        }
        print(
            f"{case.name:28} {case.unit:5} {k:9.1f} {q:9.1f} {k / q:5.2f}x  "
            f"{f'{spread(kit):.0%} / {spread(qemu):.0%}':>18}"
            f"  {per_request['interrupts']:14.2f} {per_request['notifications']:10.2f}"
        )
        rows.append(
            {
                "case": case.name,
                "unit": case.unit,
                "kvmkit": k,
                "qemu": q,
                "ratio": k / q,
                "kvmkit_rounds": kit,
                "qemu_rounds": qemu,
                "kvmkit_spread": spread(kit),
                "qemu_spread": spread(qemu),
                "guest_command": " ".join(case.args),
                "kvmkit_interrupts_per_request": per_request["interrupts"],
                "kvmkit_notifications_per_request": per_request["notifications"],
                "kvmkit_device_counts": [c[case.name] for c in device_counts],
            }
        )
    write_report(
        args.json,
        where=where,
        guest_kernel=guest.kernel_version,
        cmdline=guest.cmdline,
        memory=MEMORY,
        vcpus=1,
        image_mib=image_mib,
        rounds=completed,
        rounds_asked=args.rounds,
        qemu=subprocess.run(
            ["qemu-system-x86_64", "--version"], capture_output=True, text=True
        ).stdout.splitlines()[0],
        results=rows,
        failed_attempts=failures,
    )
    return 0


def main() -> int:
    parser = placement.command_line(__doc__, "linux_virtio.json")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (each boots both VMMs)")
    parser.add_argument("--quick", action="store_true", help="a smaller image and shorter streams")
    parser.add_argument("--logs", type=Path, help="a folder for each VM's console output")
    args = parser.parse_args()
    return placement.run(args, __file__, run_here, linux=True)


if __name__ == "__main__":
    sys.exit(main())
