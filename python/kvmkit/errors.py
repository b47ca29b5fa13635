"""The exceptions kvmkit raises. All derive from :class:`KvmkitError`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvmkit.agent import ExecResult
    from kvmkit.exits import Exit


class KvmkitError(Exception):
    """Base class of every kvmkit error."""


class KvmUnavailableError(KvmkitError):
    """``/dev/kvm`` is missing or cannot be opened by this user."""


class KvmCapabilityError(KvmkitError):
    """KVM is there but lacks a capability (or API version) kvmkit needs."""


class KvmError(KvmkitError, OSError):
    """A KVM call failed; ``errno`` holds the kernel's error number."""


class ConfigError(KvmkitError, ValueError):
    """A configuration value is invalid: a size, a vCPU count, a mode, a register name."""


class IoRangeConflictError(ConfigError):
    """A port or MMIO range overlaps one that is already mapped."""


class GuestMemoryError(KvmkitError, IndexError):
    """A guest memory access falls outside guest memory."""


class VmStateError(KvmkitError):
    """The VM is in the wrong state for the call: running, not started, or closed."""


class BootError(ConfigError):
    """A kernel, initrd or command line cannot be booted: not a kernel, truncated, too large."""


class DeviceError(ConfigError):
    """A device cannot be set up from what it was given: a disk image that is missing or not a
    multiple of 512 bytes, a tap that cannot be opened, a vsock socket path already in use."""


class ImageLockedError(DeviceError):
    """A disk image is in use elsewhere (another VM, this process's or another's, or another
    program that locks it): a read-write disk needs it to itself, a read-only one needs it free of
    writers. ``add_disk(..., lock=False)`` attaches it anyway."""


class ConsoleTimeout(KvmkitError, TimeoutError):
    """The console did not show what was expected in time (or the VM stopped first)."""


class WaitTimeout(KvmkitError, TimeoutError):
    """``VM.wait`` timed out; the VM is still running."""


class CallError(KvmkitError):
    """``Vcpu.call`` ended before the function returned; :attr:`exit` says how (a fault, a
    ``HLT``, ``stop()``)."""

    def __init__(self, message: str, exit: Exit) -> None:
        super().__init__(message)
        self.exit = exit
        self.results: list[int] = []
        """For ``Vcpu.call_many``: the values of the calls that returned before this one."""


class CallTimeout(CallError, TimeoutError):
    """``Vcpu.call`` did not return within its timeout; the vCPU was stopped where it was."""


class SnapshotError(KvmkitError):
    """A snapshot cannot be taken, saved, read or restored."""


class SnapshotFormatError(SnapshotError):
    """A snapshot's files are not usable: not a snapshot, cut short, corrupt, or a memory file of
    the wrong size. The message names the file and the problem."""


class SnapshotVersionError(SnapshotFormatError):
    """A snapshot written in a format version this kvmkit does not read."""


class SnapshotMismatchError(SnapshotError):
    """A snapshot of a VM of another shape (vCPUs, memory, devices) than the one it is restored
    into."""


class ImageError(KvmkitError):
    """A guest image cannot be read or built: not a bzImage, a failed download, no apt."""


class AgentError(KvmkitError):
    """The guest agent (:mod:`kvmkit.agent`) cannot be used: the VM has no vsock device or does
    not run, the agent does not answer (it refuses or resets connections until the deadline), it
    refused a request, or its reply breaks the protocol."""


class AgentTimeout(AgentError, TimeoutError):
    """A command run through the guest agent did not end in time (the agent killed its process
    group), or the agent did not reply in time. ``stdout`` and ``stderr`` hold the output that
    came before."""

    def __init__(self, message: str, stdout: bytes = b"", stderr: bytes = b"") -> None:
        super().__init__(message)
        self.stdout = stdout
        self.stderr = stderr


class CommandFailed(AgentError):
    """A command run with ``check=True`` ended with a non-zero status; ``result`` is its
    :class:`~kvmkit.agent.ExecResult` (stdout, stderr, status)."""

    def __init__(self, message: str, result: ExecResult | None = None) -> None:
        super().__init__(message)
        self.result = result


class GuestOSError(AgentError, OSError):
    """Something the guest agent did in the guest failed: a file that cannot be opened, read or
    written, a program that cannot be executed. ``errno`` is the guest's error number and
    ``strerror`` its message."""


class NestedError(KvmkitError):
    """The nested machine (:mod:`kvmkit.nested`) cannot run a command: no QEMU, no kernel package,
    a kernel module that does not load, a machine that does not boot."""


class NestedTimeout(NestedError, TimeoutError):
    """The command in the nested machine did not end in time; the machine was stopped."""


__all__ = [
    "AgentError",
    "AgentTimeout",
    "BootError",
    "CommandFailed",
    "ConfigError",
    "ConsoleTimeout",
    "DeviceError",
    "GuestMemoryError",
    "GuestOSError",
    "ImageError",
    "ImageLockedError",
    "IoRangeConflictError",
    "KvmCapabilityError",
    "KvmError",
    "KvmUnavailableError",
    "KvmkitError",
    "NestedError",
    "NestedTimeout",
    "VmStateError",
    "WaitTimeout",
]


def check_timeout(timeout: float | None) -> None:
    """Raises :class:`ConfigError` for a timeout that is not a non-negative number of seconds
    (NaN included); None means no timeout."""
    if timeout is not None and not timeout >= 0:
        raise ConfigError(f"timeout must be a non-negative number of seconds, not {timeout}")
