"""Function calls (``Vcpu.call``), Unicorn-style runs (``until``, ``count``), registers by name,
register access from handlers, and whole-vCPU contexts, on small 64-bit guests."""

from __future__ import annotations

from pathlib import Path

import pytest
from kvmkit import ExitReason
from kvmkit.errors import CallError, CallTimeout, ConfigError, VmStateError

pytestmark = pytest.mark.kvm

CODE = 0x1_0000
STACK = 0x8000
M64 = (1 << 64) - 1
# Functions at CODE + offset (hand-assembled; each comment is the source).
FUNCTIONS = {
    # lea rax, [rdi + rsi * 2]; ret
    "lea": (0x00, bytes.fromhex("488d0477c3")),
    # mov rax, rdi; add rax, rsi; add rax, rdx; add rax, rcx; add rax, r8; add rax, r9; ret
    "sum6": (0x10, bytes.fromhex("4889f8 4801f0 4801d0 4801c8 4c01c0 4c01c8 c3")),
    # hlt
    "halt": (0x30, bytes.fromhex("f4")),
    # jmp $
    "spin": (0x40, bytes.fromhex("ebfe")),
    # add qword [rdi], 1; mov rax, [rdi]; ret
    "count": (0x50, bytes.fromhex("48830701 488b07 c3")),
    # mov al, dil; out 0x80, al; in al, 0x81; ret
    "io": (0x70, bytes.fromhex("4088f8 e680 e481 c3")),
    # mov rax, rsp; ret
    "rsp": (0x80, bytes.fromhex("4889e0c3")),
}
COUNTER = 0x2_0000


def entry(name: str) -> int:
    return CODE + FUNCTIONS[name][0]


@pytest.fixture
def cpu_vm(make_vm):
    """A 2 MiB VM with the functions loaded and vCPU 0 in long mode."""
    vm = make_vm()
    for offset, code in FUNCTIONS.values():
        vm.mem_write(CODE + offset, code)
    vm.vcpus[0].setup("long", entry=CODE, stack=STACK)
    return vm


@pytest.mark.standard_kvm
def test_calls_pass_system_v_arguments_and_return_rax(cpu_vm):
    cpu = cpu_vm.vcpus[0]
    for i in range(500):
        assert cpu.call(entry("lea"), i, 3 * i) == 7 * i
    assert cpu.call(entry("sum6"), 1, 2, 3, 4, 5, 6) == 21
    assert cpu.call(entry("sum6"), -1, 0, 0, 0, 0, 0) == M64, "negative arguments in two's complement"
    # The function's stack is 16-byte aligned before the call's return address is pushed.
    assert cpu.call(entry("rsp")) == STACK - 8
    assert cpu.call(entry("rsp"), stack=0x7FFF) == 0x7FF0 - 8
    regs = cpu.regs
    # RSP is back where the call put it; RDI keeps the last value passed in it.
    assert (regs.rsp, regs.rdi) == (0x7FF0, M64)


@pytest.mark.standard_kvm
def test_call_many_calls_once_per_argument_list(cpu_vm):
    cpu = cpu_vm.vcpus[0]
    assert cpu.call_many(entry("lea"), [(i, i) for i in range(300)]) == [3 * i for i in range(300)]
    assert cpu.call_many(entry("lea"), []) == []
    counted = cpu.call_many(entry("count"), [(COUNTER,)] * 3)
    assert counted == [1, 2, 3]
    # Any iterable of iterables; each call's I/O is served within the batch's one run.
    generated = cpu.call_many(entry("lea"), (range(i, i + 2) for i in range(4)))
    assert generated == [i + 2 * (i + 1) for i in range(4)]
    seen = []
    cpu_vm.hook_io(0x80, write=lambda port, data: seen.append(data[0]))
    cpu_vm.hook_io(0x81, read=lambda port, size: 0x5A)
    assert [rax & 0xFF for rax in cpu.call_many(entry("io"), [(7,), (8,)])] == [0x5A, 0x5A]
    assert seen == [7, 8]
    with pytest.raises(ConfigError, match="an argument must be an int"):
        cpu.call_many(entry("lea"), [(1, 2), (1, "two")])
    # The first call that does not return ends the batch, with the values before it.
    # mov rax, rdi; test rdi, rdi; jz +1; ret; hlt
    cpu_vm.mem_write(CODE + 0x90, bytes.fromhex("4889f8 4885ff 7401 c3 f4"))
    with pytest.raises(CallError) as failed:
        cpu.call_many(CODE + 0x90, [(1,), (2,), (0,), (3,)])
    assert failed.value.exit.reason is ExitReason.HLT
    assert failed.value.results == [1, 2]


@pytest.mark.standard_kvm
def test_a_call_runs_on_the_calling_thread_with_handlers(cpu_vm):
    seen = []
    cpu_vm.hook_io(0x80, write=lambda port, data: seen.append(data[0]))
    cpu_vm.hook_io(0x81, read=lambda port, size: 0x5A)
    assert cpu_vm.vcpus[0].call(entry("io"), 0x42) & 0xFF == 0x5A
    assert seen == [0x42]


@pytest.mark.standard_kvm
def test_memory_reset_between_calls_with_restore(cpu_vm):
    cpu = cpu_vm.vcpus[0]
    assert [cpu.call(entry("count"), COUNTER) for _ in range(3)] == [1, 2, 3]
    clean = cpu_vm.snapshot()
    for _ in range(3):
        cpu_vm.restore(clean)
        assert cpu.call(entry("count"), COUNTER) == 4


@pytest.mark.standard_kvm
def test_calls_that_do_not_return_raise_with_the_exit(cpu_vm):
    cpu = cpu_vm.vcpus[0]
    with pytest.raises(CallError, match="did not return") as failed:
        cpu.call(entry("halt"))
    assert failed.value.exit.reason is ExitReason.HLT
    with pytest.raises(CallTimeout) as timed_out:
        cpu.call(entry("spin"), timeout=0.2)
    assert timed_out.value.exit.reason is ExitReason.TIMEOUT
    assert isinstance(timed_out.value, TimeoutError)

    def broken(port, data):
        raise RuntimeError("handler broke")

    cpu_vm.hook_io(0x80, write=broken)
    with pytest.raises(RuntimeError, match="handler broke"):
        cpu.call(entry("io"), 1)
    assert cpu.call(entry("lea"), 1, 1) == 3, "the vCPU is usable afterwards"


@pytest.mark.standard_kvm
def test_calls_refuse_what_they_cannot_do(make_vm, cpu_vm):
    with pytest.raises(ConfigError, match="at most 6 arguments"):
        cpu_vm.vcpus[0].call(entry("sum6"), *range(7))
    with pytest.raises(ConfigError, match="64 bits"):
        cpu_vm.vcpus[0].call(entry("lea"), 1 << 64)
    cpu_vm.vcpus[0].setup("protected", entry=CODE, stack=STACK)
    with pytest.raises(ConfigError, match="not in 64-bit mode"):
        cpu_vm.vcpus[0].call(entry("lea"), 1, 2)
    with_irqchip = make_vm(irqchip=True)
    with_irqchip.vcpus[0].setup("long", entry=CODE, stack=STACK)
    with pytest.raises(ConfigError, match="irqchip"):
        with_irqchip.vcpus[0].call(CODE)


# mov eax, 1; mov eax, 2; mov eax, 3; out 0x99, al; hlt
COUNTED = bytes.fromhex("b801000000 b802000000 b803000000 e699 f4")


@pytest.fixture
def counted_vm(make_vm):
    vm = make_vm(unhandled_io="stop")
    vm.mem_write(0x3000, COUNTED)
    vm.vcpus[0].setup("long", entry=0x3000, stack=STACK)
    return vm


# Not in the nested machine: its emulated SVM raises no hardware breakpoints.
def test_run_until_stops_before_the_address(counted_vm):
    cpu = counted_vm.vcpus[0]
    exit_ = counted_vm.run(timeout=5, until=0x300A)
    assert exit_.reason is ExitReason.DEBUG and exit_.details["kind"] == "breakpoint"
    assert (cpu.reg_read("rip"), cpu.reg_read("eax")) == (0x300A, 2)
    assert counted_vm.run(timeout=5).reason is ExitReason.UNHANDLED_IO, "the breakpoint went with the run"


@pytest.mark.standard_kvm
def test_run_count_runs_that_many_instructions(counted_vm):
    cpu = counted_vm.vcpus[0]
    exit_ = counted_vm.run(count=2)
    assert exit_.reason is ExitReason.DEBUG and exit_.details["kind"] == "step"
    assert (cpu.reg_read("rip"), cpu.reg_read("eax")) == (0x300A, 2)
    assert counted_vm.run(count=5).reason is ExitReason.UNHANDLED_IO, (
        "an exit other than a step ends it early"
    )
    assert cpu.reg_read("eax") == 3
    with pytest.raises(ConfigError, match="positive"):
        counted_vm.run(count=0)
    cpu.reg_write("rip", 0x3005)
    assert counted_vm.run(count=1).details["rip"] == 0x300A, "a step from where RIP was moved to"


@pytest.mark.standard_kvm
def test_count_needs_a_single_vcpu(make_vm):
    with pytest.raises(ConfigError, match="only vCPU"):
        make_vm(cpus=2).run(count=1)


@pytest.mark.standard_kvm
def test_registers_by_name_know_parts_bases_and_case(cpu_vm):
    cpu = cpu_vm.vcpus[0]
    cpu.reg_write("RAX", 0x1122_3344_5566_7788)
    assert [cpu.reg_read(n) for n in ("eax", "AX", "al", "ah")] == [0x5566_7788, 0x7788, 0x88, 0x77]
    cpu.reg_write("ah", 0x1FF)
    assert cpu.reg_read("rax") == 0x1122_3344_5566_FF88, "cut to 8 bits; the rest of RAX kept"
    cpu.reg_write("eax", -1)
    assert cpu.reg_read("rax") == 0x1122_3344_FFFF_FFFF
    cpu.reg_write("r10d", 5)
    cpu.reg_write("fs_base", 0xDEAD_0000)
    assert (cpu.regs.r10, cpu.sregs.fs.base, cpu.reg_read("GS_BASE")) == (5, 0xDEAD_0000, 0)
    assert cpu.reg_read("cs") == cpu.sregs.cs.selector
    assert cpu.reg_read("rip") == cpu.reg_read("eip") == CODE
    with pytest.raises(ConfigError, match=r"unknown register \W?xmm0"):
        cpu.reg_read("xmm0")
    with pytest.raises(ConfigError, match="64 bits"):
        cpu.reg_write("rax", 1 << 64)


@pytest.mark.standard_kvm
def test_handlers_see_and_change_the_vcpu_making_the_access(make_vm):
    # Each vCPU: mov eax, 0x11; out 0x80, al; hlt
    vm = make_vm(cpus=2)
    vm.mem_write(0x1000, bytes.fromhex("b811000000 e680 f4"))
    for cpu in vm.vcpus:
        cpu.setup("long", entry=0x1000, stack=STACK)
    seen = []

    def write(port, data):
        cpu = vm.current_vcpu
        assert cpu is not None
        seen.append((cpu.index, cpu.reg_read("rip"), cpu.regs.rax & 0xFF))
        cpu.reg_write("rbx", 0x100 + cpu.index)
        other = vm.vcpus[1 - cpu.index]
        with pytest.raises(VmStateError, match="serves"):
            other.reg_read("rbx")

    vm.hook_io(0x80, write=write)
    assert vm.run(timeout=10).reason is ExitReason.HLT
    # KVM with hardware virtualization exits with RIP at the out; kvm_pvm's emulator past it.
    out_rip = 0x1007 if Path("/sys/module/kvm_pvm").exists() else 0x1005
    assert sorted(seen) == [(0, out_rip, 0x11), (1, out_rip, 0x11)]
    assert [cpu.reg_read("rbx") for cpu in vm.vcpus] == [0x100, 0x101]
    assert [cpu.reg_read("rip") for cpu in vm.vcpus] == [0x1008, 0x1008], "the out completed"
    assert vm.current_vcpu is None


@pytest.mark.standard_kvm
def test_a_handler_can_redirect_the_vcpu(make_vm):
    # out 0x80, al; mov eax, 1; hlt   /   at 0x1100: mov eax, 2; hlt
    vm = make_vm()
    vm.mem_write(0x1000, bytes.fromhex("e680 b801000000 f4"))
    vm.mem_write(0x1100, bytes.fromhex("b802000000 f4"))
    cpu = vm.vcpus[0]
    cpu.setup("long", entry=0x1000, stack=STACK)
    vm.hook_io(0x80, write=lambda port, data: vm.current_vcpu.reg_write("rip", 0x1100))
    assert vm.run(timeout=5).reason is ExitReason.HLT
    assert (cpu.reg_read("eax"), cpu.reg_read("rip")) == (2, 0x1106)


@pytest.mark.standard_kvm
def test_contexts_save_and_restore_the_whole_vcpu(make_vm, cpu_vm):
    cpu = cpu_vm.vcpus[0]
    cpu.reg_write("rbx", 0x1234)
    cpu.msr_write(0xC000_0102, 0x4200)
    cpu.fpu = cpu.fpu.replace(mxcsr=0x9F80)
    context = cpu.save_context()
    assert (context.vcpu, context.regs["rbx"]) == (0, 0x1234)
    cpu.reg_write("rbx", 0)
    cpu.msr_write(0xC000_0102, 0)
    cpu.fpu = cpu.fpu.replace(mxcsr=0x1F80)
    cpu.setup("real", entry=0x1000)
    cpu.restore_context(context)
    assert (cpu.reg_read("rbx"), cpu.msr_read(0xC000_0102), cpu.fpu.mxcsr) == (0x1234, 0x4200, 0x9F80)
    assert cpu.call(entry("lea"), 2, 2) == 6, "back in long mode"
    # The same vCPU of another VM of the same shape, with the same memory contents.
    other = make_vm()
    for offset, code in FUNCTIONS.values():
        other.mem_write(CODE + offset, code)
    other.mem_write(0x500, cpu_vm.mem_read(0x500, 0x10000 - 0x500))
    other.vcpus[0].restore_context(context)
    assert other.vcpus[0].call(entry("lea"), 1, 1) == 3
