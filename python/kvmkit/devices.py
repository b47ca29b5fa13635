"""Devices implemented in Rust, served without leaving the vCPU thread or taking the GIL.

Map them with :meth:`kvmkit.VM.add_io_device` or :meth:`kvmkit.VM.add_mmio_device`.
"""

from __future__ import annotations

from typing import Union

from kvmkit._core import NullDevice as Null
from kvmkit._core import Scratchpad

Device = Union[Null, Scratchpad]

__all__ = ["Device", "Null", "Scratchpad"]
