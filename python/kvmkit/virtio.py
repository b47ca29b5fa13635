"""virtio devices (over MMIO) for guests: disks, network cards, entropy and vsock.

Add them with :meth:`kvmkit.VM.add_disk`, :meth:`~kvmkit.VM.add_net`, :meth:`~kvmkit.VM.add_rng`
and :meth:`~kvmkit.VM.add_vsock` before :meth:`~kvmkit.VM.boot_linux`, which tells the kernel
where they are (in the ACPI DSDT and with ``virtio_mmio.device=`` on the command line). Bare-metal
guests find each device at :attr:`VirtioDevice.address`. The device models run in Rust on a thread
of their own; the guest's queue notifications reach them without a VMM exit.
"""

from __future__ import annotations

import socket
from typing import NamedTuple

from kvmkit import _core


class DeviceStats(NamedTuple):
    """What a virtio device has done so far."""

    requests: int
    """Requests (descriptor chains) completed, failed ones included; frames for a network card."""
    bytes_to_guest: int
    """Bytes the device wrote into guest buffers (disk reads, received frames, entropy)."""
    bytes_from_guest: int
    """Bytes the device took from guest buffers (disk writes, sent frames)."""
    errors: int
    """Failed requests and driver errors."""
    interrupts: int
    """Interrupts injected into the guest (none without an irqchip: drivers then poll)."""
    notifications: int
    """Queue notifications the device served."""


class VirtioDevice:
    """A virtio device attached to a VM."""

    def __init__(self, handle: _core.VirtioHandle) -> None:
        self._handle = handle

    @property
    def kind(self) -> str:
        """``"block"``, ``"net"``, ``"rng"`` or ``"vsock"``."""
        return self._handle.kind

    @property
    def address(self) -> int:
        """Guest-physical address of the device's virtio-mmio registers."""
        return self._handle.address

    @property
    def size(self) -> int:
        """Size of its MMIO window."""
        return self._handle.size

    @property
    def irq(self) -> int:
        """The GSI (IOAPIC pin) of its interrupt."""
        return self._handle.irq

    @property
    def stats(self) -> DeviceStats:
        """Its counters now."""
        return DeviceStats(**self._handle.stats())

    def __repr__(self) -> str:
        return f"<kvmkit.virtio.{type(self).__name__} at {self.address:#x} irq {self.irq}>"


class Disk(VirtioDevice):
    """A disk backed by a raw image file."""

    def __init__(self, handle: _core.VirtioHandle, path: str, read_only: bool) -> None:
        super().__init__(handle)
        self.path = path
        """The image file."""
        self.read_only = read_only
        """Whether the guest may only read it."""


class Net(VirtioDevice):
    """A network card on a Linux tap device, or with no back end (a fork's card with
    ``net="none"``): then its link is down, what the guest sends is dropped (counted as failed
    requests in :attr:`stats`) and nothing is received."""

    def __init__(self, handle: _core.VirtioHandle) -> None:
        super().__init__(handle)
        details = dict(handle.details())
        self.tap: str | None = details.get("tap")
        """The tap's interface name, or None for a card with no back end."""
        self.mac = details["mac"]
        """The card's MAC address, as given or generated (``52:54:00:12:34:56`` form)."""


class Rng(VirtioDevice):
    """An entropy source fed by the host's ``getrandom``."""


class Vsock(VirtioDevice):
    """A vsock device. The host side is a Unix socket: connect to :attr:`uds_path` and send
    ``CONNECT <port>\\n`` to reach a guest listener on that port (the device answers
    ``OK <host port>\\n``); a guest connection to host port P goes to a listener at
    ``<uds_path>_<P>``. :meth:`connect` does the first for you."""

    def __init__(self, handle: _core.VirtioHandle, cid: int, uds_path: str) -> None:
        super().__init__(handle)
        self.cid = cid
        """The guest's context id."""
        self.uds_path = uds_path
        """The Unix socket host programs connect to."""

    def connect(self, port: int, timeout: float | None = 10.0) -> socket.socket:
        """A stream to the guest's listener on ``port``, after the ``CONNECT`` handshake. Raises
        ``ConnectionRefusedError`` when the guest refuses (or nothing listens), ``TimeoutError``
        when it does not answer in ``timeout`` seconds."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(self.uds_path)
            sock.sendall(f"CONNECT {port}\n".encode())
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = sock.recv(1)
                if not chunk:
                    raise ConnectionRefusedError(f"the guest refused vsock port {port}")
                reply += chunk
            if not reply.startswith(b"OK "):
                raise ConnectionRefusedError(f"unexpected answer to CONNECT {port}: {reply!r}")
            sock.settimeout(None)
            return sock
        except socket.timeout as error:  # an OSError, not a TimeoutError, before Python 3.10
            sock.close()
            raise TimeoutError(f"the guest did not answer CONNECT {port} in {timeout} s") from error
        except BaseException:
            sock.close()
            raise

    def listen(self, port: int) -> socket.socket:
        """A listening Unix socket at ``<uds_path>_<port>``, where the guest's connections to host
        port ``port`` arrive."""
        path = f"{self.uds_path}_{port}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            sock.listen()
        except BaseException:
            sock.close()
            raise
        return sock


__all__ = ["DeviceStats", "Disk", "Net", "Rng", "VirtioDevice", "Vsock"]
