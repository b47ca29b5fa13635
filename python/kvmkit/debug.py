"""Breakpoints, watchpoints and the debug callback of a :class:`~kvmkit.VM`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

from kvmkit.exits import Exit, ExitReason

if TYPE_CHECKING:
    from kvmkit._core import Vm as _CoreVm
    from kvmkit.cpu import Vcpu

WatchAccess = Literal["write", "readwrite"]
DebugCallback = Callable[["Vcpu", Exit], bool]
"""``callback(vcpu, event)``: return True to continue the run, False to end it with the event."""


class Breakpoint:
    """A hardware breakpoint: the run stops before the instruction at :attr:`address` runs.
    Resuming goes on past it. :meth:`remove` takes it away (the VM must be stopped)."""

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
        if details.get("kind") == "hardware" and handle is not None:
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
