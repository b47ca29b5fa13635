"""Boot time of the default guest: kvmkit against QEMU's microvm booting the same kernel,
initramfs and command line in the same run, and kvmkit's own memory overhead.

Each side's console is timestamped line by line from the moment the VM starts; the table gives
the time to each boot milestone both reach (banner, CPUs counted, ... up to the init's ready
marker) and their ratio. On hosts where neither reaches the ready marker (paravirtualized KVM
stops unmodified kernels early), the furthest common milestone is the comparison.

VMM memory overhead: the process's resident memory minus the guest memory it has touched
(the guest mapping's resident pages) minus what the process used before creating the VM,
against Firecracker's published figure of 5 MiB; the whole process without guest memory
(the Python interpreter included) is printed too.

Without `earlyprintk` a kernel's early messages reach the serial console together when the
console driver registers, so the first milestones share that moment.

Usage: python benchmarks/bench_boot.py [--timeout SECONDS] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import re
import selectors
import shutil
import subprocess
import sys
import time
from pathlib import Path

import kvmkit
from kvmkit.demo import EMULATOR_SAFE_CMDLINE, MILESTONES, PARAVIRTUAL_KVM
from kvmkit.images import default_guest
from report import write_report

HERE = Path(__file__).resolve().parent
MEMORY = "256M"
CPUS = 2
FIRECRACKER_OVERHEAD_MIB = 5.0


def reached(timeline: list[tuple[float, bytes]]) -> dict[str, float]:
    """Seconds to each milestone, from lines stamped with their arrival time."""
    seen: dict[str, float] = {}
    for stamp, line in timeline:
        for name, pattern in MILESTONES:
            if name not in seen and re.search(pattern, line):
                seen[name] = stamp
    return seen


def resident_kib(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def guest_resident_kib(size_kib: int) -> int:
    """Resident pages of the anonymous mappings the size of guest memory (the guest's RAM)."""
    total, size = 0, None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line.startswith("Size:"):
            size = int(line.split()[1])
        elif line.startswith("Rss:") and size == size_kib:
            total += int(line.split()[1])
    return total


def boot_kvmkit(kernel: Path, initrd: Path, cmdline: str, timeout: float) -> dict[str, object]:
    before = resident_kib()
    timeline: list[tuple[float, bytes]] = []
    with kvmkit.VM(memory=MEMORY, cpus=CPUS, irqchip=True, pit=True) as vm:
        console = vm.boot_linux(kernel, initrd=initrd, cmdline=cmdline)
        started = time.perf_counter()
        vm.start()
        pending = b""
        while time.perf_counter() - started < timeout:
            data = console.read(timeout=0.2)
            now = time.perf_counter() - started
            *lines, pending = (pending + data).split(b"\n")
            timeline += [(now, line) for line in lines]
            if b"kvmkit-guest-ready" in data or not vm.running:
                break
        timeline.append((time.perf_counter() - started, pending))
        guest_kib = guest_resident_kib(kvmkit.parse_size(MEMORY) // 1024)
        process_kib = resident_kib() - guest_kib
        overhead_kib = process_kib - before
        vm.stop()
        exit_ = vm.wait(timeout=30)
        return {
            "milestones": reached(timeline),
            "end": str(exit_),
            "boot_timer_s": vm.boot_time,
            "vmm_overhead_mib": overhead_kib / 1024,
            "process_without_guest_mib": process_kib / 1024,
            "guest_touched_mib": guest_kib / 1024,
        }


def boot_qemu(kernel: Path, initrd: Path, cmdline: str, timeout: float) -> dict[str, object]:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return {"milestones": {}, "end": "qemu-system-x86_64 is not installed (Debian: qemu-system-x86)"}
    # qemu64 with x2apic: QEMU's default "host" model asks for MSRs some KVM hosts refuse.
    command = [qemu, "-M", "microvm,x-option-roms=off,rtc=on", "-accel", "kvm", "-cpu", "qemu64,+x2apic"]
    command += ["-m", MEMORY, "-smp", str(CPUS), "-nodefaults", "-no-user-config", "-nographic"]
    command += ["-serial", "stdio", "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline]
    started = time.perf_counter()
    child = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert child.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(child.stdout, selectors.EVENT_READ)
    timeline: list[tuple[float, bytes]] = []
    pending = b""
    while time.perf_counter() - started < timeout and child.poll() is None:
        if selector.select(timeout=0.2):
            data = os.read(child.stdout.fileno(), 65536)
            now = time.perf_counter() - started
            *lines, pending = (pending + data).split(b"\n")
            timeline += [(now, line) for line in lines]
            if b"kvmkit-guest-ready" in data:
                break
    timeline.append((time.perf_counter() - started, pending))
    child.terminate()
    child.wait(timeout=10)
    tail = b"\n".join(line for _, line in timeline[-3:]).decode(errors="replace").strip()
    return {
        "milestones": reached(timeline),
        "end": f"exit status {child.returncode}; last output: {tail[-300:]}",
    }


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds each boot may take")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "boot.json")
    args = parser.parse_args()
    guest = default_guest()
    cmdline = guest.cmdline
    if os.path.exists(PARAVIRTUAL_KVM):
        cmdline += " " + EMULATOR_SAFE_CMDLINE
    kit = boot_kvmkit(guest.vmlinux, guest.initrd, cmdline, args.timeout)
    qemu = boot_qemu(guest.vmlinux, guest.initrd, cmdline, args.timeout)
    print(f"kernel {guest.kernel_version}, {CPUS} vCPUs, {MEMORY}, vmlinux + initramfs, cmdline: {cmdline}")
    print(f"{'milestone':16} {'kvmkit s':>9} {'QEMU microvm s':>15} {'ratio':>7}")
    kit_times, qemu_times = kit["milestones"], qemu["milestones"]
    assert isinstance(kit_times, dict) and isinstance(qemu_times, dict)
    for name, _ in MILESTONES:
        k, q = kit_times.get(name), qemu_times.get(name)
        ratio = f"{k / q:6.2f}x" if k is not None and q else "      -"
        print(f"{name:16} {seconds(k):>9} {seconds(q):>15} {ratio}")
    print(f"kvmkit ended: {kit['end']}")
    print(f"QEMU ended: {qemu['end']}")
    print(f"kvmkit boot timer: {kit['boot_timer_s']}")
    overhead = kit["vmm_overhead_mib"]
    assert isinstance(overhead, float)
    print(
        f"VMM memory overhead: {overhead:.1f} MiB (guest touched {kit['guest_touched_mib']:.1f} MiB) "
        f"= {overhead / FIRECRACKER_OVERHEAD_MIB:.2f}x Firecracker's {FIRECRACKER_OVERHEAD_MIB} MiB; "
        f"the whole process without guest memory, Python included: {kit['process_without_guest_mib']:.1f} MiB"
    )
    write_report(args.json, guest_kernel=guest.kernel_version, cmdline=cmdline, kvmkit_run=kit, qemu=qemu)
    return 0


if __name__ == "__main__":
    sys.exit(main())
