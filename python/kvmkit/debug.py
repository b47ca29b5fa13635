"""Breakpoints, watchpoints and the debug callback of a :class:`~kvmkit.VM`."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Literal

from kvmkit.errors import ConfigError
from kvmkit.exits import Exit, ExitReason

if TYPE_CHECKING:
    from kvmkit._core import Vm as _CoreVm
    from kvmkit.cpu import Vcpu

INT3 = b"\xcc"

WatchAccess = Literal["write", "readwrite"]
DebugCallback = Callable[["Vcpu", Exit], bool]
"""``callback(vcpu, event)``: return True to continue the run, False to end it with the event."""


class Breakpoint:
    """A breakpoint: the run stops before the instruction at :attr:`address` runs. Resuming goes
    on past it. :meth:`remove` takes it away (the VM must be stopped)."""

    hardware = True

    def __init__(self, debug: DebugState, slot: int, address: int) -> None:
        self._debug = debug
        self._slot: int | None = slot
        self.address = address

    @property
    def active(self) -> bool:
        """Whether it is still set."""
        return self._slot is not None

    def remove(self) -> None:
        """Takes the breakpoint away; removing it again does nothing."""
        if self._slot is not None:
            self._debug._remove(self._slot)
            self._slot = None

    def __repr__(self) -> str:
        state = "" if self.active else ", removed"
        return f"<Breakpoint {self.address:#x}{state}>"


class SoftwareBreakpoint(Breakpoint):
    """A breakpoint made by an ``int3`` patched over the instruction's first byte, at guest-physical
    address :attr:`physical`; :meth:`~kvmkit.VM.mem_read` shows the original byte."""

    hardware = False

    def __init__(self, debug: DebugState, address: int, physical: int, original: int) -> None:
        super().__init__(debug, -1, address)
        self.physical = physical
        self.original = original
        self._set = True

    @property
    def active(self) -> bool:
        return self._set

    def remove(self) -> None:
        if self._set:
            self._debug._remove_software(self)
            self._set = False


class Watchpoint(Breakpoint):
    """A hardware watchpoint on :attr:`length` bytes at :attr:`address`: the run stops right
    after an instruction that writes them (or, with ``access="readwrite"``, reads them)."""

    def __init__(self, debug: DebugState, slot: int, address: int, length: int, access: WatchAccess) -> None:
        super().__init__(debug, slot, address)
        self.length = length
        self.access = access

    def __repr__(self) -> str:
        state = "" if self.active else ", removed"
        return f"<Watchpoint {self.access} {self.length} bytes at {self.address:#x}{state}>"


class DebugState:
    """What a VM's breakpoints, watchpoints and debug callback share with its vCPUs."""

    def __init__(self, core: _CoreVm) -> None:
        self._core = core
        self._slots: dict[int, Breakpoint] = {}
        # Software breakpoints by guest-physical address, and the vCPUs stopped on one.
        self._software: dict[int, SoftwareBreakpoint] = {}
        self._stopped_on: dict[int, SoftwareBreakpoint] = {}
        self.callback: DebugCallback | None = None
        # Whether start() began a run that wait() has not reported yet.
        self.started = False

    def add_breakpoint(self, address: int) -> Breakpoint:
        slot = self._core.add_hw_slot("execute", address, 1)
        handle = Breakpoint(self, slot, address)
        self._slots[slot] = handle
        return handle

    def add_watchpoint(self, address: int, length: int, access: WatchAccess) -> Watchpoint:
        slot = self._core.add_hw_slot(access, address, length)
        handle = Watchpoint(self, slot, address, length, access)
        self._slots[slot] = handle
        return handle

    def add_software_breakpoint(self, address: int, physical: int) -> SoftwareBreakpoint:
        if physical in self._software:
            raise ConfigError(f"there is already a software breakpoint at {address:#x}")
        if not self._software:
            self._core.set_software_breakpoints(True)
        original = self._core.mem_read(physical, 1)[0]
        handle = SoftwareBreakpoint(self, address, physical, original)
        self._core.mem_write(physical, INT3)
        self._software[physical] = handle
        return handle

    def _remove_software(self, handle: SoftwareBreakpoint) -> None:
        self._core.mem_write(handle.physical, bytes([handle.original]))
        del self._software[handle.physical]
        self._stopped_on = {k: v for k, v in self._stopped_on.items() if v is not handle}
        if not self._software:
            self._core.set_software_breakpoints(False)

    @contextlib.contextmanager
    def unpatched(self) -> Iterator[None]:
        """Puts the original bytes back under the software breakpoints for the block (a snapshot
        taken in it holds no ``int3``), and the ``int3`` back after."""
        for bp in self._software.values():
            self._core.mem_write(bp.physical, bytes([bp.original]))
        try:
            yield
        finally:
            self.repatch()

    def repatch(self) -> None:
        """Writes the ``int3`` of every software breakpoint again, over what memory holds now
        (after a restore, say), keeping that as the original byte."""
        for bp in self._software.values():
            bp.original = self._core.mem_read(bp.physical, 1)[0]
            if bp.original == INT3[0]:
                continue
            self._core.mem_write(bp.physical, INT3)

    def hide(self, addr: int, data: bytes) -> bytes:
        """``data`` read from guest-physical ``addr`` with the original bytes in place of the
        ``int3`` of software breakpoints."""
        inside = [bp for phys, bp in self._software.items() if addr <= phys < addr + len(data)]
        if not inside:
            return data
        shown = bytearray(data)
        for bp in inside:
            shown[bp.physical - addr] = bp.original
        return bytes(shown)

    def step_over_software(self, vcpu: Vcpu, mask_interrupts: bool = True) -> Exit | None:
        """When ``vcpu`` stopped on a software breakpoint and still sits there, runs the original
        instruction (putting the ``int3`` back after) and returns the step's exit."""
        handle = self._stopped_on.pop(vcpu.index, None)
        if handle is None or not handle.active or vcpu.regs.rip != handle.address:
            return None
        self._core.mem_write(handle.physical, bytes([handle.original]))
        try:
            return self.describe(Exit._from_core(self._core.step(vcpu.index, mask_interrupts)))
        finally:
            self._core.mem_write(handle.physical, INT3)

    def _remove(self, slot: int) -> None:
        self._core.remove_hw_slot(slot)
        del self._slots[slot]

    def describe(self, exit_: Exit) -> Exit:
        """Adds to a DEBUG exit's details what was hit: ``kind`` becomes ``"breakpoint"`` or
        ``"watchpoint"`` for a debug register, with the handle, its ``address`` and, for a
        watchpoint, its ``access``."""
        if exit_.reason is not ExitReason.DEBUG:
            return exit_
        details = dict(exit_.details)
        details["vcpu"] = exit_.vcpu
        handle = self._slots.get(details.pop("slot", -1))
        if details.get("kind") == "software":
            software = next((bp for bp in self._software.values() if bp.address == details["rip"]), None)
            if software is not None:
                details.update(kind="breakpoint", breakpoint=software, address=software.address)
                if exit_.vcpu is not None:
                    self._stopped_on[exit_.vcpu] = software
        elif details.get("kind") == "hardware" and handle is not None:
            details["address"] = handle.address
            if isinstance(handle, Watchpoint):
                details["kind"] = "watchpoint"
                details["watchpoint"] = handle
                details["access"] = handle.access
            else:
                details["kind"] = "breakpoint"
                details["breakpoint"] = handle
        return dataclasses.replace(exit_, details=details)

    def should_continue(self, exit_: Exit, vcpus: list[Vcpu]) -> bool:
        """Asks the callback, for a breakpoint or watchpoint hit, whether the run goes on."""
        if self.callback is None or exit_.reason is not ExitReason.DEBUG or exit_.vcpu is None:
            return False
        return bool(self.callback(vcpus[exit_.vcpu], exit_))
