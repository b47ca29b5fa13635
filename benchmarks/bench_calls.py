"""Function calls from Python: ``Vcpu.call`` of an FNV-1a checksum over 0, 16, 256 and 4,096
bytes, against the C floor and against Unicorn, on the same machine code, in alternating rounds.

- C floor (``baseline.c call``): per call, the registers written into ``kvm_run``'s synchronized
  copy and one ``KVM_RUN`` from a ``call *%r11; hlt`` trampoline, as ``Vcpu.call`` does.
- kvmkit: ``cpu.call(FNV1A, DATA, length)`` in a Python loop, calls per second; and the same
  calls as one ``cpu.call_many`` batch, which pays Python's own cost once.
- Unicorn (``unicorn`` from PyPI, installed into the environment when missing): the same bytes in
  a 64-bit ``Uc``, per call RSP, RDI and RSI written, the return address put on the stack and
  ``emu_start(entry, return address)``, then RAX read.

The goal is kvmkit at 0.8x the C floor's calls per second or more for the 0-byte call. Where this
host's KVM is paravirtualized, guest instructions are emulated, which slows both KVM sides and
flatters Unicorn; ``--where nested`` measures in kvmkit's nested machine as well, where every
instruction is emulated too. Compare ratios, not times.

Usage: python benchmarks/bench_calls.py [--quick] [--rounds N] [--calls N] [--json PATH]
       [--where auto|here|nested]
"""

from __future__ import annotations

import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import kvmkit
import placement
from bench_exits import c_baseline, result_row
from report import write_report

HERE = Path(__file__).resolve().parent
FNV1A = 0x1000
DATA = 0x10_0000
STACK = 0x8000
LENGTHS = (0, 16, 256, 4096)
SOURCE = """
    .code64
    movabs $0xcbf29ce484222325, %rax
    movabs $0x100000001b3, %rcx
    test %rsi, %rsi
    jz 2f
1:  movzbl (%rdi), %edx
    xor %rdx, %rax
    imul %rcx, %rax
    inc %rdi
    dec %rsi
    jnz 1b
2:  ret
"""


def calls_for(length: int, calls: int) -> int:
    """Calls per round for a checksum over ``length`` bytes: fewer for longer ones, whose guest
    instructions an emulating host runs a thousand times slower than hardware."""
    return max(50, int(calls / (1 + length / 4)))


def data(length: int) -> bytes:
    return bytes((i * 7 + 1) & 0xFF for i in range(length))


def fnv1a(payload: bytes) -> int:
    value = 0xCBF29CE484222325
    for byte in payload:
        value = ((value ^ byte) * 0x100000001B3) & 0xFFFF_FFFF_FFFF_FFFF
    return value


def assemble(workdir: Path) -> Path:
    source, obj, flat = workdir / "fnv1a.S", workdir / "fnv1a.o", workdir / "fnv1a.bin"
    source.write_text(SOURCE)
    subprocess.run(["as", "--64", "-o", obj, source], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", obj, flat], check=True)
    return flat


def kvmkit_rate(code: bytes, length: int, calls: int, batch: bool = False) -> float:
    with kvmkit.VM(memory="2M") as vm:
        vm.mem_write(FNV1A, code)
        vm.mem_write(DATA, data(length))
        cpu = vm.vcpus[0]
        cpu.setup("long", entry=FNV1A, stack=STACK)
        call = cpu.call
        if call(FNV1A, DATA, length) != fnv1a(data(length)):
            raise RuntimeError("kvmkit's call returned a wrong checksum")
        arg_lists = [(DATA, length)] * calls
        started = time.perf_counter()
        if batch:
            cpu.call_many(FNV1A, arg_lists)
        else:
            for _ in range(calls):
                call(FNV1A, DATA, length)
        return calls / (time.perf_counter() - started)


def unicorn_rate(code: bytes, length: int, calls: int) -> float:
    from unicorn import UC_ARCH_X86, UC_MODE_64, Uc
    from unicorn.x86_const import UC_X86_REG_RAX, UC_X86_REG_RDI, UC_X86_REG_RSI, UC_X86_REG_RSP

    returns_to = 0x4F0
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 2 << 20)
    uc.mem_write(FNV1A, code)
    uc.mem_write(DATA, data(length))
    frame = struct.pack("<Q", returns_to)

    def call() -> int:
        uc.reg_write(UC_X86_REG_RSP, STACK - 8)
        uc.mem_write(STACK - 8, frame)
        uc.reg_write(UC_X86_REG_RDI, DATA)
        uc.reg_write(UC_X86_REG_RSI, length)
        uc.emu_start(FNV1A, returns_to)
        return int(uc.reg_read(UC_X86_REG_RAX))

    if call() != fnv1a(data(length)):
        raise RuntimeError("Unicorn returned a wrong checksum")
    started = time.perf_counter()
    for _ in range(calls):
        call()
    return calls / (time.perf_counter() - started)


def ensure_unicorn() -> None:
    try:
        import unicorn  # noqa: F401
    except ImportError:
        print("installing unicorn from PyPI", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "unicorn"], check=True)


def main() -> int:
    parser = placement.parser(__doc__, "calls.json", "fewer calls and rounds")
    parser.add_argument("--calls", type=int, help="calls per round and case")
    args = parser.parse_args()
    status = placement.relaunch(args, __file__, cpus=1)
    if status is not None:
        return status
    ensure_unicorn()
    calls = args.calls or (2000 if args.quick else 20000)
    rounds = args.rounds or (2 if args.quick else 7)
    print(f"{rounds} rounds of up to {calls} calls per case, on {placement.describe()}", flush=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kvmkit-bench-") as tmp:
        flat = assemble(Path(tmp))
        code = flat.read_bytes()
        baseline = Path(tmp) / "baseline"
        subprocess.run(["cc", "-O2", "-std=c11", "-o", baseline, HERE / "baseline.c"], check=True)
        for length in LENGTHS:
            c_rates, kit_rates, batch_rates, uc_rates = [], [], [], []
            count = calls_for(length, calls)
            for _ in range(rounds):
                floor = c_baseline(baseline, Path(tmp), "call", "fnv1a", str(count), str(length))
                if floor["rax"] != fnv1a(data(length)):
                    raise RuntimeError("the C floor returned a wrong checksum")
                c_rates.append(1e9 / floor["ns_per_call"])
                kit_rates.append(kvmkit_rate(code, length, count))
                batch_rates.append(kvmkit_rate(code, length, count, batch=True))
                uc_rates.append(unicorn_rate(code, length, count))
            goal = 0.8 if length == 0 else None
            row = result_row(
                f"FNV-1a, {length} bytes", "calls/s", c_rates, kit_rates, goal, lower_is_better=False
            )
            row["batched"] = statistics.median(batch_rates)
            row["batched_rounds"] = batch_rates
            row["batched_ratio"] = statistics.median(b / f for b, f in zip(batch_rates, c_rates))
            row["unicorn"] = statistics.median(uc_rates)
            row["unicorn_rounds"] = uc_rates
            row["kvmkit_vs_unicorn"] = statistics.median(k / u for k, u in zip(kit_rates, uc_rates))
            rows.append(row)
            print(
                f"  {length:5} bytes: C {row['c']:9.0f}  kvmkit {row['kvmkit']:9.0f}  "
                f"batched {row['batched']:9.0f}  Unicorn {row['unicorn']:9.0f} calls/s",
                flush=True,
            )
    print(
        f"{'case':22} {'C floor':>10} {'kvmkit':>10} {'batched':>10} {'Unicorn':>10} {'vs C':>7} "
        f"{'batch/C':>8} {'vs Unicorn':>11}  goal"
    )
    for r in rows:
        goal = "" if r["goal"] is None else f"{r['goal']} {'met' if r['met'] else 'MISSED'}"
        print(
            f"{r['case']:22} {r['c']:10.0f} {r['kvmkit']:10.0f} {r['batched']:10.0f} {r['unicorn']:10.0f} "
            f"{r['ratio']:6.3f}x {r['batched_ratio']:7.3f}x {r['kvmkit_vs_unicorn']:10.2f}x  {goal}"
        )
    print(f"on {placement.describe()}")
    write_report(args.json, where=placement.describe(), calls=calls, rounds=rounds, results=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
