"""What setup() gives compiled code: SSE, XSAVE and AVX turned on, a default stack aligned as the
SysV ABI has it at function entry, and a return address that halts. The compiled-code runs build
guests/sse_math.c with plain -O2 (floats and doubles in SSE registers, vectorised loops)."""

import math
import shutil
import struct
import subprocess
from pathlib import Path

import kvmkit
import pytest
from kvmkit import ExitReason
from support import run_build_step

pytestmark = [pytest.mark.kvm, pytest.mark.standard_kvm]

LOAD_ADDR = 0x10_0000  # where the compiled function is linked and loaded
IN_ADDR, OUT_ADDR = 0x20_0000, 0x21_0000
COUNT = 64  # MAX in sse_math.c
CR0_MP, CR0_EM = 1 << 1, 1 << 2
CR4_OSFXSR, CR4_OSXMMEXCPT, CR4_OSXSAVE = 1 << 9, 1 << 10, 1 << 18
XCR0_X87, XCR0_SSE, XCR0_AVX = 1, 1 << 1, 1 << 2
WORD = {"protected": 4, "long": 8}
BOTH_MODES = pytest.mark.parametrize("mode", ["protected", "long"])


def cpuid_leaf(cpu, function, index=0):
    return next(e for e in cpu.cpuid if e.function == function and e.index == index)


@BOTH_MODES
def test_setup_turns_on_sse_xsave_and_avx(make_vm, mode):
    cpu = make_vm().vcpus[0]
    cpu.setup(mode, entry=0x1000)

    sregs = cpu.sregs
    assert sregs.cr0 & (CR0_MP | CR0_EM) == CR0_MP
    assert sregs.cr4 & (CR4_OSFXSR | CR4_OSXMMEXCPT) == CR4_OSFXSR | CR4_OSXMMEXCPT
    leaf1 = cpuid_leaf(cpu, 1)
    if not leaf1.ecx & (1 << 26):  # no XSAVE: nothing more to turn on
        assert not sregs.cr4 & CR4_OSXSAVE
        return
    assert sregs.cr4 & CR4_OSXSAVE
    leaf_d = cpuid_leaf(cpu, 0xD)
    supported = leaf_d.eax | leaf_d.edx << 32
    avx = XCR0_AVX if leaf1.ecx & (1 << 28) and supported & XCR0_AVX else 0
    assert cpu.xcrs[0] == XCR0_X87 | XCR0_SSE | avx


def test_real_mode_is_left_as_it_was(make_vm):
    cpu = make_vm().vcpus[0]
    cpu.reg_write("rsp", 0x7C00)
    cpu.setup("real", entry=0x1000)
    assert not cpu.sregs.cr4 & (CR4_OSFXSR | CR4_OSXSAVE)
    assert cpu.regs.rsp == 0x7C00


@BOTH_MODES
def test_default_stack_is_entered_as_if_called(make_vm, mode):
    vm = make_vm(cpus=2)
    vm.mem_write(0x1000, b"\xc3")  # ret
    for cpu in vm.vcpus:
        cpu.setup(mode, entry=0x1000)

    for index, cpu in enumerate(vm.vcpus):
        top = kvmkit.DEFAULT_STACK - index * kvmkit.DEFAULT_STACK_SIZE
        rsp = cpu.regs.rsp
        assert rsp == top - WORD[mode] and (rsp + WORD[mode]) % 16 == 0
    # The return address halts: an entry function that returns ends the run with HLT.
    assert vm.run(timeout=10).reason is ExitReason.HLT
    for index, cpu in enumerate(vm.vcpus):
        assert cpu.regs.rsp == kvmkit.DEFAULT_STACK - index * kvmkit.DEFAULT_STACK_SIZE


def test_a_given_stack_is_used_as_is(make_vm):
    cpu = make_vm().vcpus[0]
    cpu.setup("long", entry=0x1000, stack=0x7000)
    assert cpu.regs.rsp == 0x7000


def test_a_vm_too_small_for_the_default_stack_keeps_its_stack_pointer(make_vm):
    cpu = make_vm(memory="256K").vcpus[0]
    cpu.reg_write("rsp", 0x2000)
    cpu.setup("protected", entry=0x1000)
    assert cpu.regs.rsp == 0x2000


CFLAGS = ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-ffreestanding", "-fno-pic", "-fno-pie"]
CFLAGS += ["-fno-stack-protector", "-fno-asynchronous-unwind-tables", "-fno-math-errno"]
TARGETS = {
    # mode: (compiler flags, linker emulation)
    "protected": (["-m32", "-msse2", "-mfpmath=sse"], "elf_i386"),
    "long": (["-m64"], "elf_x86_64"),
}


def tool_output(*cmd):
    return subprocess.run([str(part) for part in cmd], capture_output=True, text=True, check=True).stdout


def build_sse_math(mode, outdir):
    """(flat image linked at LOAD_ADDR, entry, disassembly) of guests/sse_math.c for ``mode``."""
    arch, emulation = TARGETS[mode]
    obj, elf, flat = (outdir / f"sse-{mode}.{ext}" for ext in ("o", "elf", "bin"))
    run_build_step(["gcc", *arch, *CFLAGS, "-c", "-o", obj, Path(__file__).parent / "guests" / "sse_math.c"])
    run_build_step(["ld", "-m", emulation, "-N", f"-Ttext={LOAD_ADDR:#x}", "-e", "compute", "-o", elf, obj])
    run_build_step(["objcopy", "-O", "binary", elf, flat])
    symbols = [line.split() for line in tool_output("nm", elf).splitlines()]
    entry = next(int(fields[0], 16) for fields in symbols if fields[-1] == "compute")
    return flat.read_bytes(), entry, tool_output("objdump", "-d", elf)


@pytest.fixture(scope="session")
def sse_math(tmp_path_factory):
    """sse_math(mode) -> build_sse_math(mode), cached per session."""
    missing = [tool for tool in ("gcc", "ld", "objcopy", "objdump", "nm") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    outdir = tmp_path_factory.mktemp("sse-math")
    built = {}

    def _build(mode):
        if mode not in built:
            built[mode] = build_sse_math(mode, outdir)
        return built[mode]

    return _build


def f32(value):
    return struct.unpack("<f", struct.pack("<f", value))[0]


@BOTH_MODES
@pytest.mark.hw_kvm  # the paravirtualized KVM emulates SSE instructions and gives up on most
def test_compiled_sse_code_runs(make_vm, sse_math, mode):
    image, entry, listing = sse_math(mode)
    assert "mulps" in listing and "movaps" in listing and "sqrtsd" in listing, "the build uses SSE"
    inputs = [i * 1.25 - 7.0 for i in range(COUNT)]
    n = 50
    vm = make_vm(memory="4M")
    vm.mem_write(LOAD_ADDR, image)
    vm.mem_write(IN_ADDR, struct.pack(f"<{COUNT}f", *inputs))
    cpu = vm.vcpus[0]
    cpu.setup(mode, entry=entry)  # the default stack, whose return address halts
    args = ("rax", "rdx", "rcx") if mode == "protected" else ("rdi", "rsi", "rdx")
    for name, value in zip(args, (OUT_ADDR, IN_ADDR, n)):
        cpu.reg_write(name, value)

    exit = vm.run(timeout=10)

    assert exit.reason is ExitReason.HLT, exit
    local = [f32(f32(x * 0.5) + 1.0) for x in inputs]
    mean, norm = struct.unpack_from("<dd", vm.mem_read(OUT_ADDR, 16))
    scaled = struct.unpack_from(f"<{COUNT}f", vm.mem_read(OUT_ADDR + 16, 4 * COUNT))
    # Doubles added in order, as the C code does: the same roundings, so the same bits.
    assert mean == sum(local[:n]) / n
    assert norm == math.sqrt(sum(x * x for x in local[:n]))
    assert list(scaled) == [f32(x * 3.0) for x in local]
