"""vCPUs and their register state."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from kvmkit.errors import CallError, CallTimeout, check_timeout

if TYPE_CHECKING:
    from kvmkit._core import VcpuContext
    from kvmkit._core import Vm as _CoreVm
    from kvmkit.debug import DebugState
    from kvmkit.exits import Exit

CpuMode = Literal["real", "protected", "long"]
CpuidRegister = Literal["eax", "ebx", "ecx", "edx"]


def _from_dict(cls: type[Any], raw: dict[str, Any]) -> Any:
    return cls(**{f.name: raw[f.name] for f in fields(cls)})


_T = TypeVar("_T")


def _copy_of_state(cls: type[_T]) -> type[_T]:
    """Makes a frozen dataclass of vCPU state say, when assigned to, that it is a copy and how to
    change the vCPU instead: ``cpu.regs.rax = 5`` would otherwise change nothing."""

    def refuse(self: object, name: str, value: object) -> None:
        raise dataclasses.FrozenInstanceError(
            f"cannot assign to {cls.__name__}.{name}: it is a copy of the vCPU's state; change the "
            f"vCPU with vcpu.reg_write(name, value), or assign a copy made with .replace({name}=...) back"
        )

    def replace(self: _T, **changes: Any) -> _T:
        """A copy with the fields named in ``changes`` replaced."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    cls.__setattr__ = refuse  # type: ignore[method-assign]
    cls.replace = replace  # type: ignore[attr-defined]
    return cls


@_copy_of_state
@dataclass(frozen=True)
class Regs:
    """General-purpose registers, RIP and RFLAGS: a copy, which ``vcpu.regs = regs`` writes back.
    It cannot be changed in place; ``regs.replace(rax=5)`` makes a changed copy."""

    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 2

    if TYPE_CHECKING:

        def replace(self, **changes: int) -> Regs: ...


@_copy_of_state
@dataclass(frozen=True)
class Segment:
    """A segment register with its hidden descriptor part."""

    base: int = 0
    limit: int = 0
    selector: int = 0
    type: int = 0
    present: int = 0
    dpl: int = 0
    db: int = 0
    s: int = 0
    l: int = 0  # noqa: E741 - the architectural name of the long-mode bit
    g: int = 0
    avl: int = 0
    unusable: int = 0

    if TYPE_CHECKING:

        def replace(self, **changes: int) -> Segment: ...


@_copy_of_state
@dataclass(frozen=True)
class DescriptorTable:
    """GDTR or IDTR."""

    base: int = 0
    limit: int = 0

    if TYPE_CHECKING:

        def replace(self, **changes: int) -> DescriptorTable: ...


_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
_TABLES = ("gdt", "idt")
_CONTROL = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")


@_copy_of_state
@dataclass(frozen=True)
class SRegs:
    """Segment, descriptor-table and control registers: a copy, as :class:`Regs` is."""

    cs: Segment
    ds: Segment
    es: Segment
    fs: Segment
    gs: Segment
    ss: Segment
    tr: Segment
    ldt: Segment
    gdt: DescriptorTable
    idt: DescriptorTable
    cr0: int
    cr2: int
    cr3: int
    cr4: int
    cr8: int
    efer: int
    apic_base: int

    @classmethod
    def _from_core(cls, raw: dict[str, Any]) -> SRegs:
        parts: dict[str, Any] = {name: _from_dict(Segment, raw[name]) for name in _SEGMENTS}
        parts.update({name: _from_dict(DescriptorTable, raw[name]) for name in _TABLES})
        parts.update({name: raw[name] for name in _CONTROL})
        return cls(**parts)

    if TYPE_CHECKING:

        def replace(self, **changes: Any) -> SRegs: ...


@_copy_of_state
@dataclass(frozen=True)
class Fpu:
    """x87 and SSE state. ``fpr`` holds 8 and ``xmm`` 16 values of 16 bytes. A copy, as
    :class:`Regs` is."""

    fcw: int
    fsw: int
    ftwx: int
    last_opcode: int
    last_ip: int
    last_dp: int
    mxcsr: int
    fpr: list[bytes]
    xmm: list[bytes]

    if TYPE_CHECKING:

        def replace(self, **changes: Any) -> Fpu: ...


@dataclass(frozen=True)
class CpuidEntry:
    """One CPUID leaf/subleaf as a vCPU reports it."""

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


@dataclass(frozen=True)
class CpuidEdit:
    """A change to the CPUID every vCPU of a VM reports: clear, then set, bits of one register.

    ``subleaf=None`` edits every subleaf of the leaf. Example, hiding CMPXCHG16B::

        VM(cpuid=[CpuidEdit(leaf=1, register="ecx", clear=1 << 13)])
    """

    leaf: int
    register: CpuidRegister
    clear: int = 0
    set: int = 0
    subleaf: int | None = None

    def _to_core(self) -> tuple[int, int | None, str, int, int]:
        return (self.leaf, self.subleaf, self.register, self.clear, self.set)


class Vcpu:
    """One vCPU of a :class:`~kvmkit.VM`. Its state can be read and written while the VM is
    stopped; during a run those calls raise :class:`~kvmkit.errors.VmStateError`."""

    def __init__(self, core: _CoreVm, index: int, debug: DebugState | None = None) -> None:
        self._core = core
        self.index = index
        self._debug = debug

    def __repr__(self) -> str:
        return f"<Vcpu {self.index}>"

    def setup(self, mode: CpuMode, entry: int, stack: int | None = None, *, exceptions: bool = True) -> None:
        """Puts the vCPU in ``mode`` at ``entry`` so raw code can run there.

        ``real``: CS:IP reaches ``entry`` (below 1 MiB); data segments have base 0.
        ``protected``: 32-bit flat segments, paging off; GDT at 0x500.
        ``long``: 64-bit with the first 4 GiB identity mapped (2 MiB pages, tables at
        0x9000-0xefff); GDT at 0x500. Protected and long mode turn on SSE, and XSAVE and AVX
        where the vCPU's CPUID has them, as compiled code expects.

        ``stack`` sets the stack pointer. Without it the vCPU gets its default stack, whose top
        is ``kvmkit.DEFAULT_STACK - index * kvmkit.DEFAULT_STACK_SIZE``, entered as if called:
        the stack pointer is one return address (4 or 8 bytes) below the top, and that return
        address halts the vCPU. A VM whose RAM does not reach it, real mode, and vCPUs from the
        28th on keep the stack pointer as it was. Other general registers are kept, so set
        arguments before or after.

        ``exceptions`` (protected and long mode) points the IDT at kvmkit's exception table, so
        that a guest exception ends the run with ``ExitReason.GUEST_FAULT``; with False the IDT
        is left empty and an exception shuts the vCPU down (``SHUTDOWN``).
        """
        self._core.enter_mode(self.index, mode, entry, stack, exceptions)

    @property
    def regs(self) -> Regs:
        """General-purpose registers, RIP and RFLAGS."""
        return _from_dict(Regs, self._core.get_regs(self.index))  # type: ignore[no-any-return]

    @regs.setter
    def regs(self, regs: Regs) -> None:
        self._core.set_regs(self.index, dataclasses.asdict(regs))

    @property
    def sregs(self) -> SRegs:
        """Segment, descriptor-table and control registers."""
        return SRegs._from_core(self._core.get_sregs(self.index))

    @sregs.setter
    def sregs(self, sregs: SRegs) -> None:
        self._core.set_sregs(self.index, dataclasses.asdict(sregs))

    @property
    def fpu(self) -> Fpu:
        """x87 and SSE state."""
        return _from_dict(Fpu, self._core.get_fpu(self.index))  # type: ignore[no-any-return]

    @fpu.setter
    def fpu(self, fpu: Fpu) -> None:
        self._core.set_fpu(self.index, dataclasses.asdict(fpu))

    def reg_read(self, name: str) -> int:
        """One register by name, in any case: the 64-bit general registers and their 32-, 16- and
        8-bit parts (``rax``, ``eax``, ``ax``, ``al``, ``ah``, ``r8d``, ``r8w``, ``r8b``, ...),
        ``rip``/``eip``/``ip``, ``rflags``/``eflags``/``flags``, ``cr0``, ``cr2``, ``cr3``,
        ``cr4``, ``cr8``, ``efer``, ``apic_base``, ``fs_base``, ``gs_base`` and the selectors
        ``cs``, ``ds``, ``es``, ``fs``, ``gs``, ``ss``. Also from a handler, for the vCPU whose
        access it serves (see :attr:`VM.current_vcpu <kvmkit.VM.current_vcpu>`)."""
        return self._core.reg_read(self.index, name)

    def reg_write(self, name: str, value: int) -> None:
        """Sets one register by name (see :meth:`reg_read`). The value is cut to the register's
        width (negative values in two's complement), and writing a part of a register leaves its
        other bits as they were: ``reg_write("al", 1)`` keeps the rest of RAX, as in Unicorn."""
        self._core.reg_write(self.index, name, value)

    def save_context(self) -> VcpuContext:
        """The vCPU's whole state (registers, FPU and vector state, MSRs, local APIC, pending
        events, debug registers), as a snapshot keeps it, for :meth:`restore_context`."""
        return self._core.save_context(self.index)

    def restore_context(self, context: VcpuContext) -> None:
        """Puts back what :meth:`save_context` took, from this vCPU or the same vCPU of a VM of the
        same shape. Memory is not part of it (see :meth:`VM.snapshot <kvmkit.VM.snapshot>`)."""
        self._core.restore_context(self.index, context)

    def call(self, entry: int, *args: int, stack: int | None = None, timeout: float | None = None) -> int:
        """Calls the 64-bit function at ``entry`` with up to six integer arguments (System V: RDI,
        RSI, RDX, RCX, R8, R9) and returns RAX when it returns. The vCPU must be in long mode
        (:meth:`setup`), in a VM without ``irqchip``; only this vCPU runs, on the calling thread,
        so a call that makes no I/O costs one ``KVM_RUN``. The stack is ``stack``, or the vCPU's
        RSP, rounded down to 16 bytes. The function returns to a few instructions kvmkit keeps at
        guest address 0x4f0 (``HLT`` after the call): R11 and RBX are set by the call, the other
        registers keep their values, so they can be read after it.

        A call that does not return raises :class:`~kvmkit.errors.CallError` with the
        :class:`~kvmkit.exits.Exit` (a fault, a ``HLT``, ``stop()``); after ``timeout`` seconds,
        :class:`~kvmkit.errors.CallTimeout`. An exception a handler raised comes out as it is.
        Ctrl-C stops the call and raises ``KeyboardInterrupt``."""
        if timeout is not None:
            check_timeout(timeout)
        result = self._core.call(self.index, entry, args, stack, timeout)
        if isinstance(result, int):
            return result
        raise self._call_error(entry, result, timeout)

    def call_many(
        self,
        entry: int,
        arg_lists: Iterable[Iterable[int]],
        stack: int | None = None,
        timeout: float | None = None,
    ) -> list[int]:
        """:meth:`call` once per argument list, in one call from Python and one run (each return
        sets up the next call without leaving it), so that Python's own cost and the run's start
        are paid once for the batch: the list of RAX values. ``timeout`` is for the whole batch. A
        call that does not return raises :class:`~kvmkit.errors.CallError` (its ``results`` hold
        the values of the calls before it)."""
        if timeout is not None:
            check_timeout(timeout)
        results, ended = self._core.call_many(self.index, entry, arg_lists, stack, timeout)
        if ended is None:
            return results
        error = self._call_error(entry, ended, timeout)
        error.results = results
        raise error

    def _call_error(self, entry: int, raw: dict[str, Any], timeout: float | None) -> CallError:
        from kvmkit.exits import Exit, ExitReason

        exit_ = Exit._from_core(raw)
        if self._debug is not None:
            exit_ = self._debug.describe(exit_)
        where = f"the call of {entry:#x} on vCPU {self.index}"
        if exit_.reason is ExitReason.TIMEOUT:
            return CallTimeout(f"{where} did not return within {timeout} s", exit_)
        return CallError(f"{where} did not return: {exit_.message}", exit_)

    def msr_read(self, index: int) -> int:
        """One model-specific register."""
        return self.get_msrs([index])[index]

    def msr_write(self, index: int, value: int) -> None:
        """Sets one model-specific register."""
        self._core.set_msrs(self.index, [(index, value)])

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """Several MSRs at once, by index."""
        return dict(self._core.get_msrs(self.index, list(indices)))

    def set_msrs(self, values: dict[int, int]) -> None:
        """Sets several MSRs at once."""
        self._core.set_msrs(self.index, list(values.items()))

    @property
    def xcrs(self) -> dict[int, int]:
        """The extended control registers by index (XCR0, the XSAVE feature mask, is 0)."""
        return dict(self._core.get_xcrs(self.index))

    @property
    def cpuid(self) -> list[CpuidEntry]:
        """The CPUID the vCPU reports."""
        return [CpuidEntry(*entry) for entry in self._core.get_cpuid(self.index)]

    def set_cpuid(self, entries: Iterable[CpuidEntry]) -> None:
        """Replaces the CPUID table (KVM accepts this only before the vCPU first runs)."""
        self._core.set_cpuid(self.index, [dataclasses.astuple(e) for e in entries])

    # Debugging

    def step(self, mask_interrupts: bool = True) -> Exit:
        """Runs exactly one instruction on this vCPU (the VM must be stopped; the other vCPUs
        stay stopped) and returns the exit: normally ``ExitReason.DEBUG`` with ``details``
        ``{"kind": "step", "rip": ...}`` (``rip`` is the linear address of the next instruction),
        or ``"watchpoint"`` when the instruction hit one. Interrupts are kept out during the step
        unless ``mask_interrupts`` is false. Instruction breakpoints do not fire on a step."""
        from kvmkit.exits import Exit

        if self._debug is not None:
            # On a software breakpoint, the step runs the instruction under the int3.
            over = self._debug.step_over_software(self, mask_interrupts)
            if over is not None:
                return over
        exit_ = Exit._from_core(self._core.step(self.index, mask_interrupts))
        return exit_ if self._debug is None else self._debug.describe(exit_)

    def translate(self, vaddr: int) -> int | None:
        """The guest-physical address the vCPU's page tables map the virtual (linear) address
        ``vaddr`` to, or None when it is not mapped. With paging off, ``vaddr`` itself."""
        return self._core.translate(self.index, vaddr)
