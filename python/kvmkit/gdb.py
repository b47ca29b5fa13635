"""The gdb server of a :class:`~kvmkit.VM` (:meth:`~kvmkit.VM.serve_gdb`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from kvmkit import _core

BreakpointMode = Literal["auto", "hardware", "software"]
"""How the server sets gdb's ``break`` breakpoints: ``"auto"`` takes a debug register while one
of the four is free and patches an ``int3`` after; ``"hardware"`` only takes debug registers (for
a KVM that keeps ``int3`` to the guest, such as a paravirtualized one); ``"software"`` always
patches an ``int3``. ``hbreak`` always takes a debug register."""


class GdbServer:
    """A gdb server for one VM, listening on :attr:`address` until :meth:`close` (closing the VM
    closes it too). One client at a time: a client that connects takes the VM over (a run in
    progress ends with ``STOPPED``); the VM then runs only when gdb continues or steps it, and
    Ctrl-C in gdb stops it; a malformed packet gets an error reply. When the client detaches or
    disconnects (even while the VM is stopped), its breakpoints and watchpoints go and the VM is
    started again in the background (:meth:`VM.wait` collects the end of that run), unless the
    guest ended for good meanwhile (every vCPU halted) or gdb killed it, which leaves the VM
    stopped. Python handlers keep serving the guest's I/O throughout."""

    def __init__(self, core: _core.GdbServer) -> None:
        self._core = core

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` the server listens on."""
        return self._core.address

    @property
    def port(self) -> int:
        """The TCP port, useful when the server was asked for port 0 (any free one)."""
        return self._core.address[1]

    @property
    def attached(self) -> bool:
        """Whether a gdb client is attached (and so drives the VM)."""
        return self._core.attached

    @property
    def sessions(self) -> int:
        """How many clients have attached so far."""
        return self._core.sessions

    @property
    def closed(self) -> bool:
        return self._core.closed

    def wait_attached(self, timeout: float | None = None) -> bool:
        """Waits until a client is attached; False if none is after ``timeout`` seconds."""
        return self._core.wait_attached(timeout)

    def wait_detached(self, timeout: float | None = None) -> bool:
        """Waits until no client is attached (the session's end has left the VM running or
        stopped, as described above); False if one still is after ``timeout`` seconds."""
        return self._core.wait_detached(timeout)

    def close(self) -> None:
        """Stops serving. An attached client is cut off, and its session ends as a disconnect
        does. Closing again does nothing."""
        self._core.close()

    def __enter__(self) -> GdbServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        host, port = self.address
        state = "closed" if self.closed else "attached" if self.attached else "listening"
        return f"<kvmkit.gdb.GdbServer {host}:{port}, {state}>"
