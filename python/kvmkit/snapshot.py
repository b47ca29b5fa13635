"""Snapshots: a VM frozen at one point, restored in place, saved to a directory, or forked.

A :class:`Snapshot` comes from :meth:`kvmkit.VM.snapshot`. It holds the VM's whole state (vCPUs,
interrupt controllers, clock, devices) and its memory, which it shares with the VM's memory file
page by page, so taking one is cheap and keeping many is too. :meth:`kvmkit.VM.restore` puts a VM
back to it (copying only the memory pages written since), :meth:`Snapshot.save` writes it to a
directory and :meth:`kvmkit.VM.from_snapshot` brings it back, in this process or another.

What a snapshot does not hold: Python handlers (``hook_io``, ``hook_mmio``, Python devices) keep
their own state; a VM made from a snapshot has none until they are added again.
"""

from __future__ import annotations

import json
import os
from typing import Any

from kvmkit import _core

SETUP_VERSION = 1
"""The version of the description of a VM's devices kept in a snapshot's state file."""


class Snapshot:
    """A VM's state and memory at one point."""

    def __init__(self, core: _core.Snapshot, setup: dict[str, Any]) -> None:
        self._core = core
        self._setup = setup

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the snapshot into the directory ``path`` (created if needed): ``state``, a
        versioned, checksummed state file that also describes the VM's devices, and ``memory``,
        guest memory as a flat sparse file."""
        self._core.save(os.fspath(path), json.dumps(self._setup))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Snapshot:
        """Reads a snapshot saved with :meth:`save`. Memory is not read now: a VM made from it maps
        the memory file and reads each page when the guest first touches it. A directory that is
        not a snapshot, a state file that is cut short, corrupt or of another format version, or a
        memory file of the wrong size raises a :class:`~kvmkit.errors.SnapshotFormatError`."""
        core, setup = _core.Snapshot.load(os.fspath(path))
        return cls(core, json.loads(setup) if setup and setup != "null" else {})

    @property
    def cpus(self) -> int:
        """The number of vCPUs of the VM it is of."""
        return int(self._core.config["vcpus"])

    @property
    def memory_regions(self) -> list[tuple[int, int]]:
        """``(guest_addr, size)`` of each RAM region."""
        return [(int(addr), int(size)) for addr, size in self._core.config["memory"]]

    @property
    def own_bytes(self) -> int:
        """Bytes of memory this snapshot holds of its own; it shares the rest with its VM."""
        return self._core.own_bytes

    def mem_read(self, addr: int, size: int) -> bytes:
        """``size`` bytes of the snapshot's memory at ``addr``."""
        return self._core.mem_read(addr, size)

    def __repr__(self) -> str:
        return f"<kvmkit.Snapshot {self.cpus} vCPU(s), memory {self.memory_regions}>"


__all__ = ["Snapshot"]
