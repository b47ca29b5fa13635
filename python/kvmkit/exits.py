"""How a run ends."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class ExitReason(enum.Enum):
    """Why a vCPU, or a whole run, stopped."""

    HLT = "hlt"
    """Every vCPU executed HLT (with no in-kernel irqchip to wait for interrupts)."""
    SHUTDOWN = "shutdown"
    """Triple fault."""
    RESET = "reset"
    """The guest asked for a reset."""
    POWEROFF = "poweroff"
    """The guest powered off."""
    CRASH = "crash"
    """The guest reported a crash."""
    INTERNAL_ERROR = "internal_error"
    """KVM could not go on; ``details`` has ``suberror``, ``data`` and ``instruction`` (the bytes
    KVM fetched at the instruction it could not emulate, that instruction first)."""
    FAIL_ENTRY = "fail_entry"
    """The hardware refused to enter the guest."""
    UNHANDLED_IO = "unhandled_io"
    """An access reached no device under ``unhandled_io="stop"``; ``details`` says where."""
    HANDLER_ERROR = "handler_error"
    """A device or Python handler failed (the handler's exception is raised from run/wait)."""
    DEBUG = "debug"
    """A single step finished, or a breakpoint or watchpoint was hit; ``details`` has ``kind``
    (``"step"``, ``"breakpoint"``, ``"watchpoint"``), ``rip`` (the linear address of the next
    instruction), ``vcpu``, ``dr6``, and for a hit the handle (``breakpoint`` or
    ``watchpoint``), its ``address`` and, for a watchpoint, its ``access``."""
    GUEST_FAULT = "guest_fault"
    """A guest exception (vectors 0-31) reached kvmkit's exception table (``vcpu.setup(...,
    exceptions=True)``, the default); ``details`` has ``vector``, ``name`` (``"#PF"``),
    ``error_code`` (None for vectors without one), ``rip`` (the faulting instruction, or for a
    trap such as ``#BP`` the next one) and ``cr2`` (the faulting address of a ``#PF``, else
    None). The vCPU is put back at the exception: its registers are as they were then, and
    running again retries the instruction."""
    STOPPED = "stopped"
    """``stop()`` was called, Ctrl-C was pressed, or (per vCPU) another vCPU ended the run."""
    TIMEOUT = "timeout"
    """The run's time limit passed."""
    PAUSED = "paused"
    """``pause()`` was called; ``resume()`` continues the guest where it stopped."""
    VMM_ERROR = "vmm_error"
    """Something outside the guest failed; ``details["message"]`` says what."""


@dataclass(frozen=True)
class Exit:
    """How a run ended."""

    reason: ExitReason
    vcpu: int | None
    """The vCPU whose exit ended the run, if one did."""
    vcpu_reasons: list[ExitReason]
    """How each vCPU ended, by index; empty when a timeout or Ctrl-C ended ``run()`` while a
    handler was still busy."""
    details: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    rip: int | None = None
    """RIP of the vCPU that ended the run, read when the run ended (None when no vCPU did)."""

    @classmethod
    def _from_core(cls, raw: dict[str, Any]) -> Exit:
        return cls(
            reason=ExitReason(raw["reason"]),
            vcpu=raw["vcpu"],
            vcpu_reasons=[ExitReason(r) for r in raw["vcpu_reasons"]],
            details=raw["details"],
            message=raw["message"],
            rip=raw.get("rip"),
        )

    def __str__(self) -> str:
        where = f" on vCPU {self.vcpu}" if self.vcpu is not None else ""
        return f"{self.message}{where}"
