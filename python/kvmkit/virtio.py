"""virtio devices (over MMIO) for guests: disks, network cards, entropy and vsock.

Add them with :meth:`kvmkit.VM.add_disk`, :meth:`~kvmkit.VM.add_net`, :meth:`~kvmkit.VM.add_rng`
and :meth:`~kvmkit.VM.add_vsock` before :meth:`~kvmkit.VM.boot_linux`, which tells the kernel
where they are (in the ACPI DSDT and with ``virtio_mmio.device=`` on the command line). Bare-metal
guests find each device at :attr:`VirtioDevice.address`. The device models run in Rust on a thread
of their own; the guest's queue notifications reach them without a VMM exit.
"""

from __future__ import annotations

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
    """Interrupts raised."""
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
    """A network card on a Linux tap device."""

    def __init__(self, handle: _core.VirtioHandle) -> None:
        super().__init__(handle)
        details = dict(handle.details())
        self.tap = details["tap"]
        """The tap's interface name."""
        self.mac = details["mac"]
        """The card's MAC address, as given or generated (``52:54:00:12:34:56`` form)."""


class Rng(VirtioDevice):
    """An entropy source fed by the host's ``getrandom``."""


__all__ = ["DeviceStats", "Disk", "Net", "Rng", "VirtioDevice"]
