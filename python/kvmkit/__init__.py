"""kvmkit: KVM virtual machines for Python.

Create a :class:`VM`, put code in its memory, serve its port I/O and MMIO from Python handlers or
Rust devices, and run it at KVM speed::

    import kvmkit

    with kvmkit.VM(memory="2M") as vm:
        vm.mem_write(0x1000, code)
        vm.vcpus[0].setup("long", entry=0x1000)
        vm.hook_io(0xE9, write=lambda port, data: print(data.decode(), end=""))
        print(vm.run(timeout=5).reason)
"""

from kvmkit import agent, debug, devices, errors, snapshot, virtio
from kvmkit._core import DEFAULT_STACK, DEFAULT_STACK_SIZE, EXCEPTION_PORT, VcpuContext, __version__
from kvmkit.agent import ExecResult
from kvmkit.console import Console
from kvmkit.cpu import CpuidEdit, CpuidEntry, CpuMode, DescriptorTable, Fpu, Regs, Segment, SRegs, Vcpu
from kvmkit.exits import Exit, ExitReason
from kvmkit.snapshot import Snapshot
from kvmkit.vm import VM, parse_size

__all__ = [
    "DEFAULT_STACK",
    "DEFAULT_STACK_SIZE",
    "EXCEPTION_PORT",
    "VM",
    "Console",
    "CpuMode",
    "CpuidEdit",
    "CpuidEntry",
    "DescriptorTable",
    "ExecResult",
    "Exit",
    "ExitReason",
    "Fpu",
    "Regs",
    "SRegs",
    "Segment",
    "Snapshot",
    "Vcpu",
    "VcpuContext",
    "__version__",
    "agent",
    "debug",
    "devices",
    "errors",
    "parse_size",
    "snapshot",
    "virtio",
]
