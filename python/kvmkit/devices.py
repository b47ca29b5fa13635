"""Devices implemented in Rust, served without leaving the vCPU thread or taking the GIL.

Map them with :meth:`kvmkit.VM.add_io_device` or :meth:`kvmkit.VM.add_mmio_device`.
"""

from __future__ import annotations

from kvmkit._core import Device, Scratchpad
from kvmkit._core import NullDevice as Null

__all__ = ["Device", "Null", "Scratchpad"]
