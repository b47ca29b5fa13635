"""Guest exceptions of raw guests: kvmkit's exception table turns them into GUEST_FAULT exits
with the vector, error code, RIP and CR2; the hints exits give for common mistakes; exit.rip."""

import kvmkit
import pytest
from kvmkit import ExitReason

pytestmark = [pytest.mark.kvm, pytest.mark.standard_kvm]

LOAD_ADDR = 0x1000
UNMAPPED = (1 << 33) + 0x123  # above the 4 GiB the default long-mode tables map
MARK_RAX, MARK_RDI = 0x5EED, 0xD1
WORD = {"protected": 4, "long": 8}
BOTH_MODES = pytest.mark.parametrize("mode", ["protected", "long"])
# Which exception guests/faults.S raises, by EBX.
UD, LOAD, DIVIDE, BEYOND_IDT, BAD_SELECTOR, BREAKPOINT, CALL_AWAY, STRAY_REPORT = range(8)


@pytest.fixture
def fault(make_vm, assemble):
    """fault(mode, which, **regs) -> (vm, exit, code): runs guests/faults.S at LOAD_ADDR on a
    vCPU set up with the defaults (default stack, exception table) after setting ``regs``."""

    def _fault(mode, which, exceptions=True, **regs):
        vm = make_vm()
        code = assemble("faults", {"protected": 32, "long": 64}[mode])
        vm.mem_write(LOAD_ADDR, code)
        cpu = vm.vcpus[0]
        cpu.setup(mode, entry=LOAD_ADDR, exceptions=exceptions)
        cpu.reg_write("rbx", which)
        for name, value in regs.items():
            cpu.reg_write(name, value)
        return vm, vm.run(timeout=10), code

    return _fault


def at(code, pattern):
    """The guest address of the instruction whose bytes start with ``pattern``."""
    assert code.count(pattern) == 1, pattern
    return LOAD_ADDR + code.index(pattern)


def assert_back_at_fault(vm, exit, mode, rip):
    """The vCPU is where the exception happened, with the registers it had there."""
    regs = vm.vcpus[0].regs
    assert (exit.details["rip"], exit.rip, regs.rip) == (rip, rip, rip)
    assert (regs.rax, regs.rdi) == (MARK_RAX, MARK_RDI)
    assert regs.rsp == kvmkit.DEFAULT_STACK - WORD[mode], "the stack pointer is as it was"
    assert regs.rflags & 0x2 and not regs.rflags & (1 << 16)


@BOTH_MODES
def test_invalid_opcode(fault, mode):
    vm, exit, code = fault(mode, UD)

    assert exit.reason is ExitReason.GUEST_FAULT, exit
    assert exit.vcpu == 0
    details = exit.details
    assert (details["vector"], details["name"]) == (6, "#UD")
    assert (details["error_code"], details["cr2"]) == (None, None)
    assert_back_at_fault(vm, exit, mode, at(code, b"\x0f\x0b"))
    assert str(exit) == f"guest exception #UD (invalid opcode) at rip {exit.rip:#x} on vCPU 0"


def test_page_fault_reports_the_address_and_error_code_and_retries(fault, make_vm):
    vm, exit, code = fault("long", LOAD, rsi=UNMAPPED)

    assert exit.reason is ExitReason.GUEST_FAULT, exit
    details = exit.details
    assert (details["vector"], details["name"], details["cr2"]) == (14, "#PF", UNMAPPED)
    # Error code: not present (bit 0 clear), a read (bit 1 clear), in supervisor mode (bit 2).
    assert details["error_code"] is not None and details["error_code"] & 0b111 == 0
    assert_back_at_fault(vm, exit, "long", at(code, b"\x8b\x0e\xf4"))
    assert vm.vcpus[0].sregs.cr2 == UNMAPPED
    # Running again retries the load: now from a mapped address, it completes.
    vm.mem_write(0x3000, (0x1234_5678).to_bytes(4, "little"))
    vm.vcpus[0].reg_write("rsi", 0x3000)
    assert vm.run(timeout=10).reason is ExitReason.HLT
    assert vm.vcpus[0].regs.rcx == 0x1234_5678


@BOTH_MODES
def test_divide_error(fault, mode):
    vm, exit, code = fault(mode, DIVIDE)

    assert exit.reason is ExitReason.GUEST_FAULT, exit
    assert (exit.details["vector"], exit.details["name"], exit.details["error_code"]) == (0, "#DE", None)
    regs = vm.vcpus[0].regs
    assert (exit.rip, regs.rip) == (at(code, b"\xf7\xf1"), at(code, b"\xf7\xf1"))


@BOTH_MODES
def test_general_protection_carries_its_error_code(fault, mode):
    vm, exit, code = fault(mode, BAD_SELECTOR)

    assert exit.reason is ExitReason.GUEST_FAULT, exit
    assert (exit.details["vector"], exit.details["name"]) == (13, "#GP")
    assert exit.details["error_code"] == 0x28, "a selector beyond the GDT's limit: the selector"
    assert exit.rip == at(code, b"\x8e\xd9") == vm.vcpus[0].regs.rip


@BOTH_MODES
@pytest.mark.hw_kvm  # the paravirtualized KVM emulates `int n` and gives up on it
def test_interrupts_beyond_the_table_are_general_protection_faults(fault, mode):
    _vm, exit, _code = fault(mode, BEYOND_IDT)

    assert exit.reason is ExitReason.GUEST_FAULT, exit
    assert (exit.details["vector"], exit.details["name"]) == (13, "#GP")
    # The error code names an IDT entry (bit 1) and no external event (bit 0); the SDM puts the
    # vector in bits 3 and up (QEMU's emulated CPU, in the nested machine, its table offset).
    assert exit.details["error_code"] & 0b11 == 0b10 and exit.details["error_code"] >> 3 in (0x40, 0x80)


@BOTH_MODES
@pytest.mark.hw_kvm  # the paravirtualized KVM emulates int3 and gives up on it
def test_breakpoint_is_a_trap_past_the_int3(fault, mode):
    vm, exit, code = fault(mode, BREAKPOINT)

    assert exit.reason is ExitReason.GUEST_FAULT, exit
    assert (exit.details["vector"], exit.details["name"]) == (3, "#BP")
    assert exit.rip == at(code, b"\xcc\xf4") + 1
    # Running on continues after the int3.
    assert vm.run(timeout=10).reason is ExitReason.HLT


def test_fault_outside_guest_memory_says_so(fault):
    vm, exit, code = fault("long", CALL_AWAY, rsi=UNMAPPED)

    assert exit.reason is ExitReason.GUEST_FAULT, exit
    assert (exit.details["name"], exit.details["rip"], exit.details["cr2"]) == ("#PF", UNMAPPED, UNMAPPED)
    assert "outside guest memory" in exit.message
    # The call pushed its return address before the fetch faulted.
    regs = vm.vcpus[0].regs
    assert regs.rsp == kvmkit.DEFAULT_STACK - 16
    assert int.from_bytes(vm.mem_read(regs.rsp, 8), "little") == at(code, b"\xff\xd6") + 2


def test_a_stray_write_to_the_exception_port_is_unhandled_io(fault):
    _vm, exit, _code = fault("long", STRAY_REPORT)

    assert exit.reason is ExitReason.UNHANDLED_IO, exit
    assert (exit.details["space"], exit.details["address"]) == ("pio", kvmkit.EXCEPTION_PORT)


def test_long_mode_takes_exceptions_on_a_stack_of_its_own(fault, make_vm):
    """A broken stack is reported, and the red zone below the stack pointer is left alone."""
    vm, exit, code = fault("long", UD, rsp=UNMAPPED)
    assert exit.reason is ExitReason.GUEST_FAULT, exit
    assert (exit.details["name"], exit.rip, vm.vcpus[0].regs.rsp) == ("#UD", at(code, b"\x0f\x0b"), UNMAPPED)

    # A push to the broken stack is a page fault at the address pushed to.
    vm, exit, code = fault("long", CALL_AWAY, rsp=UNMAPPED, rsi=LOAD_ADDR)
    assert exit.reason is ExitReason.GUEST_FAULT, exit
    assert (exit.details["name"], exit.details["cr2"]) == ("#PF", UNMAPPED - 8)
    assert exit.rip == at(code, b"\xff\xd6")

    # Each vCPU has its own (in a TSS of its own).
    cpus = make_vm(cpus=2).vcpus
    for cpu in cpus:
        cpu.setup("long", entry=LOAD_ADDR)
    assert len({cpu.sregs.tr.base for cpu in cpus}) == 2


def test_red_zone_survives_a_fault(make_vm, assemble):
    vm = make_vm()
    code = assemble("faults", 64)
    vm.mem_write(LOAD_ADDR, code)
    cpu = vm.vcpus[0]
    cpu.setup("long", entry=LOAD_ADDR)
    red_zone = bytes(range(128))
    below = cpu.regs.rsp - len(red_zone)
    vm.mem_write(below, red_zone)

    assert vm.run(timeout=10).reason is ExitReason.GUEST_FAULT
    assert vm.mem_read(below, len(red_zone)) == red_zone


def test_protected_mode_faults_on_a_stack_outside_ram_are_not_reported(fault):
    """Protected mode takes exceptions on the current stack: where there is no RAM to push the
    frame to, the fault becomes a triple fault, or KVM gives up on the push."""
    vm, exit, _code = fault("protected", UD, rsp=0xC000_0000)

    assert exit.reason in (ExitReason.SHUTDOWN, ExitReason.INTERNAL_ERROR), exit
    if exit.reason is ExitReason.SHUTDOWN and vm.vcpus[0].sregs.cr0 & 1:  # AMD resets the vCPU
        assert "is the stack pointer valid?" in exit.message


@BOTH_MODES
def test_without_the_exception_table_a_fault_shuts_down(fault, mode):
    vm, exit, _code = fault(mode, UD, exceptions=False)

    assert exit.reason is ExitReason.SHUTDOWN, exit
    sregs = vm.vcpus[0].sregs
    if sregs.cr0 & 1:  # the state survives a triple fault (Intel; AMD resets it)
        assert sregs.idt.limit == 0
        assert "no IDT" in exit.message
    assert "setup()?" not in exit.message


@BOTH_MODES
def test_setup_points_the_idt_at_the_table(make_vm, mode):
    vm = make_vm()
    cpu = vm.vcpus[0]
    cpu.setup(mode, entry=LOAD_ADDR)
    idt = cpu.sregs.idt
    assert idt.limit == 32 * (16 if mode == "long" else 8) - 1
    assert vm.mem_read(idt.base, idt.limit + 1) != bytes(idt.limit + 1)


def test_a_fault_on_one_vcpu_leaves_the_other_alone(make_vm, assemble):
    """Each vCPU takes its exceptions on its own exception stack; the faulting one ends the run."""
    vm = make_vm(cpus=2)
    code = assemble("faults", 64)
    vm.mem_write(LOAD_ADDR, code)
    for index, cpu in enumerate(vm.vcpus):
        cpu.setup("long", entry=LOAD_ADDR)
        cpu.reg_write("rbx", UD if index == 1 else DIVIDE)
    exit = vm.run(timeout=10)

    assert exit.reason is ExitReason.GUEST_FAULT, exit
    faulting = vm.vcpus[exit.vcpu]
    assert faulting.regs.rsp == kvmkit.DEFAULT_STACK - exit.vcpu * kvmkit.DEFAULT_STACK_SIZE - 8
    assert faulting.regs.rip == exit.rip


def test_a_vcpu_never_set_up_gets_a_hint(make_vm):
    vm = make_vm()
    exit = vm.run(timeout=10)

    assert exit.reason is not ExitReason.HLT, exit
    assert "did you call vcpu.setup()?" in exit.message, exit.message
    assert exit.rip == vm.vcpus[0].regs.rip


def test_exit_rip_is_the_ending_vcpus_rip(make_vm, assemble):
    vm = make_vm(unhandled_io="stop")
    code = assemble("faults", 64)
    vm.mem_write(LOAD_ADDR, code)
    cpu = vm.vcpus[0]
    cpu.setup("long", entry=LOAD_ADDR, exceptions=False)
    cpu.reg_write("rbx", STRAY_REPORT)

    exit = vm.run(timeout=10)
    assert exit.reason is ExitReason.UNHANDLED_IO, exit
    assert exit.vcpu == 0 and exit.rip == cpu.regs.rip
    # At the `out`, or past it where KVM moves RIP before it exits for a port write.
    assert exit.rip - at(code, b"\xe6\xef") in (0, 2)
    cpu.reg_write("rip", LOAD_ADDR)
    step = cpu.step()
    assert step.rip == cpu.regs.rip == step.details["rip"] == LOAD_ADDR + 5  # past `mov eax, 0x5eed`
