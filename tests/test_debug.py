"""Debugging raw guests: single-step, hardware breakpoints and watchpoints, the debug callback,
and virtual addresses."""

import pytest
from kvmkit import ExitReason
from kvmkit.errors import ConfigError

# Where each test runs: single-step, page walks and breakpoint bookkeeping work on every KVM
# (standard_kvm: the nested machine too). Debug registers fire on this paravirtualized KVM and on
# hardware KVM for instruction breakpoints, but not for guests of the nested machine (QEMU's
# emulated SVM does not load them for its guest), so those tests are marked kvm only. int3 and
# data watchpoints reach kvmkit only on hardware KVM (neither the paravirtualized KVM nor the
# nested machine lets them out): hw_debug, which scripts/test.sh runs on hardware KVM only.
pytestmark = [pytest.mark.kvm]
everywhere = pytest.mark.standard_kvm
hardware_kvm_only = pytest.mark.hw_debug


CODE = 0x1000
DATA = 0x3000
HANG_GUARD = 10.0
M32 = 0xFFFF_FFFF

# 64-bit code: a few arithmetic instructions, a store and two loads.
STRAIGHT = bytes.fromhex(
    "b801000000"  # 0x00: mov eax, 1
    "bb02000000"  # 0x05: mov ebx, 2
    "01d8"  # 0x0a: add eax, ebx
    "89042500300000"  # 0x0c: mov [0x3000], eax
    "8b0c2500300000"  # 0x13: mov ecx, [0x3000]
    "8b142508300000"  # 0x1a: mov edx, [0x3008]
    "f4"  # 0x21: hlt
)
STRAIGHT_RIPS = [0x05, 0x0A, 0x0C, 0x13, 0x1A, 0x21]

# 64-bit code: EAX counts five rounds of a loop.
LOOP = bytes.fromhex(
    "31c0"  # 0x00: xor eax, eax
    "b905000000"  # 0x02: mov ecx, 5
    "ffc0"  # 0x07: inc eax   <- loop
    "ffc9"  # 0x09: dec ecx
    "75fa"  # 0x0b: jnz 0x07
    "f4"  # 0x0d: hlt
)
LOOP_TOP = CODE + 0x07


@pytest.fixture
def guest(make_vm):
    """guest(code) -> VM with `code` at CODE, vCPU 0 in long mode there."""

    def _guest(code, **kwargs):
        vm = make_vm(**kwargs)
        vm.mem_write(CODE, code)
        for cpu in vm.vcpus:
            cpu.setup("long", entry=CODE, stack=0x8000)
        return vm

    return _guest


# --------------------------------------------------------------------------- single-step


@everywhere
def test_step_runs_one_instruction_at_a_time(guest):
    vm = guest(STRAIGHT)
    cpu = vm.vcpus[0]
    for expected in STRAIGHT_RIPS:
        exit = cpu.step()
        assert exit.reason == ExitReason.DEBUG, exit
        assert exit.details["kind"] == "step"
        assert exit.details["rip"] == CODE + expected
        assert (exit.vcpu, exit.details["vcpu"]) == (0, 0)
        assert cpu.regs.rip == CODE + expected
    regs = cpu.regs
    assert (regs.rax & M32, regs.rbx & M32, regs.rcx & M32) == (3, 2, 3)
    assert vm.mem_read(DATA, 4) == (3).to_bytes(4, "little")
    # Stepping works with interrupts left unmasked too. Stepping HLT ends past it, as a step or
    # (depending on the KVM) as the halt.
    exit = cpu.step(mask_interrupts=False)
    assert exit.reason in (ExitReason.DEBUG, ExitReason.HLT)
    assert cpu.regs.rip == CODE + 0x22


@everywhere
def test_step_moves_only_the_stepped_vcpu(guest):
    vm = guest(STRAIGHT, cpus=2)
    vm.vcpus[1].step()
    vm.vcpus[1].step()
    assert vm.vcpus[1].regs.rip == CODE + 0x0A
    assert vm.vcpus[0].regs.rip == CODE


# --------------------------------------------------------------------------- breakpoints


def test_hardware_breakpoint_stops_before_the_instruction_and_resumes(guest):
    vm = guest(STRAIGHT)
    bp = vm.add_breakpoint(CODE + 0x0A, hardware=True)

    exit = vm.run(timeout=HANG_GUARD)

    assert exit.reason == ExitReason.DEBUG, exit
    assert exit.details["kind"] == "breakpoint"
    assert exit.details["breakpoint"] is bp
    assert (exit.details["address"], exit.details["rip"], exit.vcpu) == (CODE + 0x0A, CODE + 0x0A, 0)
    regs = vm.vcpus[0].regs
    assert (regs.rip, regs.rax & M32, regs.rbx & M32) == (CODE + 0x0A, 1, 2), "the add has not run"

    # Resuming goes past the breakpoint to the end.
    exit = vm.run(timeout=HANG_GUARD)
    assert exit.reason == ExitReason.HLT, exit
    assert (vm.vcpus[0].regs.rax & M32, vm.vcpus[0].regs.rcx & M32) == (3, 3)


def test_breakpoint_in_a_loop_hits_every_round(guest):
    vm = guest(LOOP)
    vm.add_breakpoint(LOOP_TOP, hardware=True)
    rounds = []
    while (exit := vm.run(timeout=HANG_GUARD)).reason == ExitReason.DEBUG:
        assert exit.details["rip"] == LOOP_TOP
        rounds.append(vm.vcpus[0].regs.rax & M32)
    assert exit.reason == ExitReason.HLT
    assert rounds == [0, 1, 2, 3, 4]


def test_step_from_a_breakpoint_moves_on(guest):
    vm = guest(STRAIGHT)
    vm.add_breakpoint(CODE + 0x0A, hardware=True)
    assert vm.run(timeout=HANG_GUARD).reason == ExitReason.DEBUG
    exit = vm.vcpus[0].step()
    assert (exit.details["kind"], exit.details["rip"]) == ("step", CODE + 0x0C)
    assert vm.vcpus[0].regs.rax & M32 == 3


@everywhere
def test_removed_breakpoint_no_longer_stops(guest):
    vm = guest(LOOP)
    bp = vm.add_breakpoint(LOOP_TOP, hardware=True)
    assert bp.active
    bp.remove()
    bp.remove()  # harmless
    assert not bp.active
    exit = vm.run(timeout=HANG_GUARD)
    assert exit.reason == ExitReason.HLT
    assert vm.vcpus[0].regs.rax & M32 == 5


def test_breakpoints_hit_on_every_vcpu(guest):
    vm = guest(STRAIGHT, cpus=2)
    vm.vcpus[0].setup("long", entry=CODE + 0x21)  # vCPU 0 only halts
    vm.add_breakpoint(CODE + 0x0C, hardware=True)
    exit = vm.run(timeout=HANG_GUARD)
    assert (exit.reason, exit.vcpu, exit.details["rip"]) == (ExitReason.DEBUG, 1, CODE + 0x0C)


@everywhere
def test_more_than_four_hardware_slots_is_a_config_error(guest):
    vm = guest(STRAIGHT)
    handles = [vm.add_breakpoint(CODE + i, hardware=True) for i in range(3)]
    handles.append(vm.add_watchpoint(DATA, 4))
    with pytest.raises(ConfigError, match="4 debug registers"):
        vm.add_breakpoint(CODE + 0x10, hardware=True)
    with pytest.raises(ConfigError, match="4 debug registers"):
        vm.add_watchpoint(DATA + 8, 8)
    handles[1].remove()
    vm.add_breakpoint(CODE + 0x10, hardware=True)  # a freed register is reused


@everywhere
def test_bad_watchpoints_are_config_errors(guest):
    vm = guest(STRAIGHT)
    with pytest.raises(ConfigError, match="aligned"):
        vm.add_watchpoint(DATA + 2, 4)
    with pytest.raises(ConfigError, match="1, 2, 4 or 8"):
        vm.add_watchpoint(DATA, 3)
    with pytest.raises(ConfigError, match="access"):
        vm.add_watchpoint(DATA, 4, access="read")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- software breakpoints


@everywhere
def test_software_breakpoints_are_hidden_and_restored(guest):
    vm = guest(LOOP)
    handles = [vm.add_breakpoint(CODE + offset) for offset in (0x00, 0x02, 0x07, 0x09, 0x0B, 0x0D)]
    assert not any(bp.hardware for bp in handles), "software is the default, and not limited to 4"
    assert vm.mem_read(CODE, len(LOOP)) == LOOP, "mem_read shows the original bytes"
    raw = bytes(vm.mem_view(CODE, len(LOOP)))
    assert [raw[bp.address - CODE] for bp in handles] == [0xCC] * 6
    with pytest.raises(ConfigError, match="already"):
        vm.add_breakpoint(CODE + 0x07)
    for bp in handles:
        bp.remove()
    assert bytes(vm.mem_view(CODE, len(LOOP))) == LOOP
    # Nothing left patched: the guest runs as if they had never been.
    assert vm.run(timeout=HANG_GUARD).reason == ExitReason.HLT


@everywhere
def test_software_breakpoints_are_left_out_of_snapshots(guest):
    vm = guest(LOOP)
    bp = vm.add_breakpoint(LOOP_TOP)
    snap = vm.snapshot()
    assert snap.mem_read(CODE, len(LOOP)) == LOOP, "the snapshot holds the original bytes"
    assert bytes(vm.mem_view(LOOP_TOP, 1)) == b"\xcc", "the breakpoint is still set"
    vm.mem_write(CODE + 0x03, b"\x07")  # mov ecx, 7
    vm.restore(snap)
    assert bytes(vm.mem_view(LOOP_TOP, 1)) == b"\xcc", "still set after a restore"
    assert vm.mem_read(CODE, len(LOOP)) == LOOP
    bp.remove()
    assert bytes(vm.mem_view(CODE, len(LOOP))) == LOOP
    assert vm.run(timeout=HANG_GUARD).reason == ExitReason.HLT
    assert vm.vcpus[0].regs.rax & M32 == 5


@hardware_kvm_only
def test_software_breakpoint_stops_and_resumes(guest):
    vm = guest(STRAIGHT)
    bp = vm.add_breakpoint(CODE + 0x0A)

    exit = vm.run(timeout=HANG_GUARD)

    assert exit.reason == ExitReason.DEBUG, exit
    assert (exit.details["kind"], exit.details["breakpoint"], exit.details["rip"]) == (
        "breakpoint",
        bp,
        CODE + 0x0A,
    )
    regs = vm.vcpus[0].regs
    assert (regs.rip, regs.rax & M32) == (CODE + 0x0A, 1), "stopped before the add"
    assert vm.mem_read(CODE, len(STRAIGHT)) == STRAIGHT
    exit = vm.run(timeout=HANG_GUARD)
    assert exit.reason == ExitReason.HLT, exit
    assert vm.vcpus[0].regs.rax & M32 == 3
    assert bytes(vm.mem_view(CODE + 0x0A, 1)) == b"\xcc", "still set after stepping over it"


@hardware_kvm_only
def test_software_breakpoint_with_callback_and_step(guest):
    vm = guest(LOOP)
    vm.add_breakpoint(LOOP_TOP)
    seen = []
    vm.on_debug(lambda cpu, event: seen.append(cpu.regs.rax & M32) or len(seen) < 3)
    exit = vm.run(timeout=HANG_GUARD)
    assert (exit.reason, seen) == (ExitReason.DEBUG, [0, 1, 2])
    # A step from the breakpoint runs the instruction under it.
    step = vm.vcpus[0].step()
    assert (step.details["kind"], step.details["rip"]) == ("step", LOOP_TOP + 2)
    assert vm.vcpus[0].regs.rax & M32 == 3
    vm.on_debug(lambda cpu, event: True)
    assert vm.run(timeout=HANG_GUARD).reason == ExitReason.HLT
    assert vm.vcpus[0].regs.rax & M32 == 5


# --------------------------------------------------------------------------- watchpoints


@hardware_kvm_only
def test_write_watchpoint_stops_right_after_the_write(guest):
    vm = guest(STRAIGHT)
    wp = vm.add_watchpoint(DATA, 4, access="write")

    exit = vm.run(timeout=HANG_GUARD)

    assert exit.reason == ExitReason.DEBUG, exit
    assert exit.details["kind"] == "watchpoint"
    assert exit.details["watchpoint"] is wp
    assert (exit.details["address"], exit.details["access"]) == (DATA, "write")
    assert exit.details["rip"] == CODE + 0x13, "stopped right after the store"
    assert vm.vcpus[0].regs.rip == CODE + 0x13
    assert vm.mem_read(DATA, 4) == (3).to_bytes(4, "little"), "the new value is in memory"

    # The load of the same address does not trigger a write watchpoint.
    assert vm.run(timeout=HANG_GUARD).reason == ExitReason.HLT


@hardware_kvm_only
def test_readwrite_watchpoint_stops_on_a_read(guest):
    vm = guest(STRAIGHT)
    vm.mem_write(DATA + 8, (0x1234_5678).to_bytes(8, "little"))
    vm.add_watchpoint(DATA + 8, 8, access="readwrite")

    exit = vm.run(timeout=HANG_GUARD)

    assert (exit.reason, exit.details["kind"], exit.details["access"]) == (
        ExitReason.DEBUG,
        "watchpoint",
        "readwrite",
    )
    regs = vm.vcpus[0].regs
    assert (regs.rip, regs.rdx & M32) == (CODE + 0x21, 0x1234_5678)
    assert vm.run(timeout=HANG_GUARD).reason == ExitReason.HLT


# --------------------------------------------------------------------------- callbacks


def test_callback_that_continues_counts_hits(guest):
    vm = guest(LOOP)
    bp = vm.add_breakpoint(LOOP_TOP, hardware=True)
    seen = []

    def on_debug(cpu, event):
        assert event.details["breakpoint"] is bp
        seen.append((cpu.index, cpu.regs.rip, cpu.regs.rax & M32))
        return True

    vm.on_debug(on_debug)
    exit = vm.run(timeout=HANG_GUARD)

    assert exit.reason == ExitReason.HLT
    assert seen == [(0, LOOP_TOP, n) for n in range(5)]
    assert vm.vcpus[0].regs.rax & M32 == 5


def test_callback_that_stops_ends_the_run_with_the_event(guest):
    vm = guest(LOOP)
    vm.add_breakpoint(LOOP_TOP, hardware=True)
    calls = []
    vm.on_debug(lambda cpu, event: calls.append(event) or len(calls) < 3)

    exit = vm.run(timeout=HANG_GUARD)

    assert (exit.reason, exit.details["kind"], len(calls)) == (ExitReason.DEBUG, "breakpoint", 3)
    assert vm.vcpus[0].regs.rax & M32 == 2


def test_callback_with_start_and_wait(guest):
    vm = guest(LOOP)
    vm.add_breakpoint(LOOP_TOP, hardware=True)
    hits = []
    vm.on_debug(lambda cpu, event: hits.append(event.details["rip"]) or True)
    vm.start()
    assert vm.wait(HANG_GUARD).reason == ExitReason.HLT
    assert hits == [LOOP_TOP] * 5
    # Waiting again reports the same end without calling back.
    assert vm.wait(HANG_GUARD).reason == ExitReason.HLT
    assert len(hits) == 5


def test_callback_exceptions_are_raised_from_run(guest):
    vm = guest(LOOP)
    vm.add_breakpoint(LOOP_TOP, hardware=True)

    def on_debug(cpu, event):
        raise KeyError("from the callback")

    vm.on_debug(on_debug)
    with pytest.raises(KeyError, match="from the callback"):
        vm.run(timeout=HANG_GUARD)
    # Without a callback the next run stops at the next round's hit.
    vm.on_debug(None)
    exit = vm.run(timeout=HANG_GUARD)
    assert (exit.reason, exit.details["rip"]) == (ExitReason.DEBUG, LOOP_TOP)
    assert vm.vcpus[0].regs.rax & M32 == 1


# --------------------------------------------------------------------------- virtual addresses


@everywhere
def test_translate_long_mode_identity_tables(guest):
    vm = guest(STRAIGHT)
    cpu = vm.vcpus[0]
    assert cpu.translate(0x1234) == 0x1234
    assert cpu.translate(0xFFFF_F123) == 0xFFFF_F123
    assert cpu.translate(0x1_0000_0000) is None, "only the first 4 GiB are mapped"
    assert cpu.translate(0x8000_0000_0000) is None, "not canonical"
    assert vm.mem_read_virtual(cpu, CODE, len(STRAIGHT)) == STRAIGHT


@everywhere
def test_translate_paging_off_is_identity(make_vm):
    vm = make_vm()
    vm.vcpus[0].setup("protected", entry=CODE)
    assert vm.vcpus[0].translate(0x12_3456) == 0x12_3456


VIRT = 0x7F00_0000_0000


@everywhere
def test_translate_a_hand_built_4k_mapping(guest):
    vm = guest(STRAIGHT)
    cpu = vm.vcpus[0]
    # VIRT -> 0x5000 and VIRT + 4 KiB -> 0x8000 (not contiguous), through PML4[0xfe].
    pml4, pdpt, pd, pt = 0x10000, 0x11000, 0x12000, 0x13000
    for addr in (pml4, pdpt, pd, pt):
        vm.mem_write(addr, bytes(4096))
    vm.mem_write(pml4 + 0xFE * 8, (pdpt | 3).to_bytes(8, "little"))
    vm.mem_write(pdpt, (pd | 3).to_bytes(8, "little"))
    vm.mem_write(pd, (pt | 3).to_bytes(8, "little"))
    vm.mem_write(pt, (0x5000 | 3).to_bytes(8, "little"))
    vm.mem_write(pt + 8, (0x8000 | 3).to_bytes(8, "little"))
    cpu.reg_write("cr3", pml4)

    assert cpu.translate(VIRT + 0x123) == 0x5123
    assert cpu.translate(VIRT + 0x1FFF) == 0x8FFF
    assert cpu.translate(VIRT + 0x2000) is None
    assert cpu.translate(CODE) is None, "the identity tables are gone"

    # Reads and writes cross the page boundary into the other physical page.
    vm.mem_write_virtual(cpu, VIRT + 0xFFC, b"abcdefgh")
    assert vm.mem_read(0x5FFC, 4) == b"abcd"
    assert vm.mem_read(0x8000, 4) == b"efgh"
    assert vm.mem_read_virtual(0, VIRT + 0xFFE, 4) == b"cdef"
    with pytest.raises(ConfigError, match="not mapped"):
        vm.mem_read_virtual(cpu, VIRT + 0x1FFE, 4)
    with pytest.raises(ConfigError, match="not mapped"):
        vm.mem_write_virtual(cpu, VIRT + 0x1FFE, b"zzzz")
    assert vm.mem_read(0x8FFE, 2) == bytes(2), "a write that fails writes nothing"
