"""Whatever a caller passes to the public API, the answer is a result or a kvmkit error: never a
panic of the Rust core (``pyo3_runtime.PanicException``), a crash, or an exception from the
machinery underneath such as ``OverflowError``. A ``TypeError`` for an argument of the wrong type
is fine.

Each property runs a bounded number of examples so that the file takes a few seconds.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable

import kvmkit
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvmkit import devices
from kvmkit.cpu import CpuidEdit
from kvmkit.errors import KvmkitError

pytestmark = [pytest.mark.kvm]

# The integers where conversions break: signs, the edges of 8 to 64 bits, and beyond.
EDGES = [0, 1, -1, 0xFF, 0x100, 0xFFFF, 0x1_0000, 2**31, 2**32, 2**62, 2**63, 2**64 - 1, 2**64, 2**70]
INTS = st.one_of(st.sampled_from(EDGES + [-e for e in EDGES]), st.integers(-(2**70), 2**70))
FLOATS = st.floats(allow_nan=True, allow_infinity=True)
ANY = st.one_of(
    INTS,
    FLOATS,
    st.none(),
    st.booleans(),
    st.text(max_size=6),
    st.binary(max_size=32),
    st.lists(INTS, max_size=3),
)
# Sizes that a VM can be given without costing this machine much: small, or impossible.
MEMORY = st.one_of(
    st.integers(-(2**70), 16 << 20),
    st.sampled_from([2**52, 2**62, 2**64, 2**70, "", "abc", "-1M", "1.5G", "12Q", "4K", "9" * 20 + "T"]),
    st.lists(st.tuples(INTS, st.one_of(st.integers(-(2**70), 16 << 20), st.text(max_size=4))), max_size=3),
    ANY,
)
TIMEOUTS = st.one_of(
    FLOATS, st.sampled_from([0, 1e-9, 1e19, 1.8e19, 2e19, 1e300, float("inf"), -1e19]), st.none(), ANY
)
REGISTERS = st.one_of(
    st.sampled_from(["rax", "rip", "rflags", "cr0", "cr3", "efer", "cs", "nope"]), st.text(max_size=4)
)

# A guest that halts at once (without the irqchip, a halt ends the run), and one for the console
# that prints a line and jumps back: cli; mov dx, 0x3f8; mov al, 'k'; out dx, al; mov al, '\n';
# out dx, al; jmp to the start.
HLT = b"\xf4"
CHATTER = bytes([0xFA, 0x66, 0xBA, 0xF8, 0x03, 0xB0, 0x6B, 0xEE, 0xB0, 0x0A, 0xEE, 0xEB, 0xF3])
CODE = 0x1000

# kvm_available only skips, so sharing it between examples is harmless.
SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def answers(call: Callable[[], object]) -> None:
    """Calls ``call``; kvmkit errors and TypeErrors are answers, anything else fails the test."""
    with contextlib.suppress(KvmkitError, TypeError):
        call()


def halting_vm(**kwargs: object) -> kvmkit.VM:
    vm = kvmkit.VM("2M", **kwargs)  # type: ignore[arg-type]
    vm.mem_write(CODE, HLT)
    vm.vcpus[0].setup("protected", entry=CODE)
    return vm


CPUID_EDITS = st.builds(
    CpuidEdit,
    leaf=INTS,
    register=st.sampled_from(["eax", "ebx", "ecx", "edx", "rax"]),
    clear=INTS,
    set=INTS,
    subleaf=st.one_of(st.none(), INTS),
)
VALID_VM = {"memory": "2M", "cpus": 1, "irqchip": False, "pit": False, "unhandled_io": "stop", "cpuid": ()}


@SETTINGS
@given(
    changes=st.fixed_dictionaries(
        {},
        optional={
            "memory": MEMORY,
            "cpus": st.one_of(st.integers(-5, 8), INTS, ANY),
            "irqchip": ANY,
            "pit": ANY,
            "unhandled_io": st.one_of(st.sampled_from(["ignore", "stop", "STOP"]), ANY),
            "cpuid": st.one_of(ANY, st.lists(st.one_of(ANY, CPUID_EDITS), max_size=2)),
        },
    )
)
def test_vm_constructor(kvm_available, changes):
    # Most arguments valid, so that each odd one is looked at rather than hidden behind another.
    answers(lambda: kvmkit.VM(**{**VALID_VM, **changes}).close())


@SETTINGS
@given(
    addr=INTS,
    size=st.one_of(INTS, ANY),
    data=st.one_of(st.binary(max_size=64), ANY),
    name=REGISTERS,
    value=ANY,
)
def test_memory_and_registers(kvm_available, addr, size, data, name, value):
    with halting_vm() as vm:
        cpu = vm.vcpus[0]
        answers(lambda: vm.mem_read(addr, size))
        answers(lambda: vm.mem_write(addr, data))
        answers(lambda: vm.mem_view(addr, size))
        answers(lambda: cpu.reg_write(name, value))
        answers(lambda: cpu.reg_read(name))
        answers(lambda: cpu.msr_write(addr, value))
        answers(lambda: cpu.setup("long", entry=addr, stack=value))


@SETTINGS
@given(
    base=INTS,
    size=st.one_of(INTS, ANY),
    handler=st.one_of(st.just(lambda *a: 0), ANY),
    pad=st.one_of(INTS, ANY),
)
def test_io_map(kvm_available, base, size, handler, pad):
    with halting_vm() as vm:
        answers(lambda: vm.hook_io(base, size, read=handler, write=handler))
        answers(lambda: vm.hook_mmio(base, size, read=handler, write=handler))
        answers(lambda: vm.add_io_device(base, size, devices.Scratchpad(pad)))
        answers(lambda: vm.add_mmio_device(base, size, devices.Null()))
        answers(lambda: vm.add_io_device(base, size, handler))  # type: ignore[arg-type]
        answers(lambda: devices.Scratchpad(16).fill(pad, b"\x01\x02"))
        answers(lambda: vm.unhook_io(base))
        answers(lambda: vm.unhook_mmio(base))


@SETTINGS
@given(timeout=TIMEOUTS)
def test_run_and_wait_timeouts(kvm_available, timeout):
    with halting_vm() as vm:
        answers(lambda: vm.run(timeout))
        vm.vcpus[0].setup("protected", entry=CODE)
        vm.start()
        answers(lambda: vm.wait(timeout))
        vm.stop()


@pytest.fixture(scope="module")
def chatty_vm():
    from conftest import KVM_SKIP_REASON, have_kvm
    from test_linux import tiny_bzimage  # a kernel that sets the VM up without booting anything

    if not have_kvm():
        pytest.skip(KVM_SKIP_REASON)
    vm = kvmkit.VM("64M", irqchip=True)
    console = vm.boot_linux(tiny_bzimage())
    vm.mem_write(0x10_0200, CHATTER)  # the tiny kernel's 64-bit entry
    yield vm, console
    vm.close()


@settings(SETTINGS, max_examples=30)
@given(timeout=TIMEOUTS, pattern=st.one_of(st.just(b"k\n"), ANY))
def test_console_timeouts(chatty_vm, timeout, pattern):
    vm, console = chatty_vm
    vm.run(timeout=0.002)  # unread output, so that a read of any length returns at once
    answers(lambda: console.read(timeout))
    vm.run(timeout=0.002)
    # A pattern that is not a regular expression raises re.error, as re.compile does.
    with contextlib.suppress(re.error):
        answers(lambda: console.expect(pattern if pattern is not None else b"k", timeout))
