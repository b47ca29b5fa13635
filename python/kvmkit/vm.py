"""The :class:`VM`: guest memory, vCPUs, I/O handlers and the run lifecycle."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import fcntl
import itertools
import logging
import os
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar, Union

from kvmkit import _aio, _core
from kvmkit.agent import Agent, Command, ExecResult, PathArg
from kvmkit.console import Console
from kvmkit.cpu import CpuidEdit, Vcpu
from kvmkit.debug import Breakpoint, DebugCallback, DebugState, WatchAccess, Watchpoint
from kvmkit.devices import Device
from kvmkit.errors import (
    AgentError,
    ConfigError,
    SnapshotFormatError,
    VmStateError,
    WaitTimeout,
    check_timeout,
)
from kvmkit.exits import Exit, ExitReason
from kvmkit.gdb import BreakpointMode, GdbServer
from kvmkit.snapshot import SETUP_VERSION, Snapshot
from kvmkit.virtio import Disk, Net, Rng, VirtioDevice, Vsock

if TYPE_CHECKING:
    from typing_extensions import Buffer

log = logging.getLogger(__name__)

Size = Union[int, str]
"""A byte count, or a string such as ``"64M"``, ``"1G"``, ``"512K"``."""
ReadHandler = Callable[[int, int], Union[int, bytes]]
"""``read(addr, size)`` returns an int that fits ``size`` bytes, or exactly ``size`` bytes."""
WriteHandler = Callable[[int, bytes], object]
"""``write(addr, data)`` receives the bytes the guest wrote."""
NetChoice = Union[str, Sequence[Union[str, Sequence[str]]]]
"""Where the network cards of forks go: ``"none"``, a tap name, or one entry per clone (see
:meth:`VM.fork`)."""

_Device = TypeVar("_Device", bound=VirtioDevice)

_live: weakref.WeakSet[VM] = weakref.WeakSet()
_fork_numbers = itertools.count(1)

DEFAULT_CMDLINE = (
    "console=ttyS0 reboot=k panic=1 pci=off 8250.nr_uarts=1 i8042.noaux i8042.nomux i8042.dumbkbd"
)
"""A command line for a guest on kvmkit's platform: COM1 console, reset through the i8042."""


def _image(image: str | os.PathLike[str] | bytes) -> str | bytes:
    """Bytes as they are; a path as a string, which the core reads straight into guest memory."""
    return image if isinstance(image, bytes) else os.fspath(image)


def parse_size(size: Size) -> int:
    """Bytes in ``size``: an int, or a string with an optional K/M/G/T suffix (binary units)."""
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise ConfigError(f"a size must be an int or a string such as '64M', not {type(size).__name__}")
    if isinstance(size, int):
        if size < 0:
            raise ConfigError(f"a size cannot be negative ({size})")
        return size
    return _core.parse_size(size)


def _memory_layout(memory: Size | Sequence[tuple[int, Size]]) -> list[tuple[int, int]]:
    if isinstance(memory, (int, str)) and not isinstance(memory, bool):
        return _core.ram_regions(parse_size(memory))
    expected = (
        "memory must be a size (an int, or a string such as '64M') or a list of (guest_addr, size) regions"
    )
    if not isinstance(memory, Sequence):
        raise ConfigError(f"{expected} regions, not {type(memory).__name__}")
    layout = []
    for region in memory:
        if not (isinstance(region, Sequence) and len(region) == 2 and isinstance(region[0], int)):
            raise ConfigError(f"{expected} regions; {region!r} is not a (guest_addr, size) pair")
        layout.append((region[0], parse_size(region[1])))
    return layout


class VM:
    """A KVM virtual machine.

    ``memory`` is a size, laid out from guest address 0 up to the MMIO gap at 0xD000_0000 and
    from 4 GiB on beyond that, or an explicit list of ``(guest_addr, size)`` regions.
    ``unhandled_io`` decides what happens to I/O that reaches no handler: ``"ignore"`` (reads
    return all ones, writes are dropped, both counted in :attr:`stats`) or ``"stop"`` (the run
    ends with ``ExitReason.UNHANDLED_IO``).

    Use it as a context manager, or call :meth:`close`, to free its file descriptors and memory
    at once; a VM no longer referenced is freed too (stopped first if it runs), by the garbage
    collector when its handlers refer back to it.
    """

    def __init__(
        self,
        memory: Size | Sequence[tuple[int, Size]] = "64M",
        cpus: int = 1,
        *,
        irqchip: bool = False,
        pit: bool = False,
        unhandled_io: Literal["ignore", "stop"] = "ignore",
        cpuid: Iterable[CpuidEdit] = (),
    ) -> None:
        if isinstance(cpus, bool) or not isinstance(cpus, int) or cpus < 1:
            raise ConfigError(f"cpus must be a positive int, not {cpus!r}")
        layout = _memory_layout(memory)
        edits = list(cpuid)
        for edit in edits:
            if not isinstance(edit, CpuidEdit):
                raise TypeError(f"cpuid must hold CpuidEdit values, not {type(edit).__name__}")
        self._adopt(_core.Vm(layout, cpus, irqchip, pit, unhandled_io, [e._to_core() for e in edits]), cpus)
        log.debug("created VM with %d vCPU(s), memory %s", cpus, [(hex(a), s) for a, s in layout])

    def _adopt(self, core: _core.Vm, cpus: int) -> None:
        self._core = core
        self._debug = DebugState(core)
        self.vcpus: list[Vcpu] = [Vcpu(self._core, i, self._debug) for i in range(cpus)]
        self._console: Console | None = None
        self._virtio: list[VirtioDevice] = []
        self._agent: Agent | None = None
        # How to build the same devices again, for snapshots restored elsewhere and forks.
        self._setup: list[dict[str, Any]] = []
        # Clean-ups of what the VM owns outside itself (a fork's disk copies): on close, or
        # when the VM is collected.
        self._cleanups: list[weakref.finalize[Any, Any]] = []
        self._gdb_servers: list[GdbServer] = []
        _live.add(self)

    def __enter__(self) -> VM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "running" if self.running else "stopped"
        return f"<kvmkit.VM {len(self.vcpus)} vCPU(s), {state}>"

    def close(self) -> None:
        """Stops the VM if it runs and frees it. Further calls raise ``VmStateError``; closing
        again does nothing."""
        for server in self._gdb_servers:
            server.close()
        self._core.close()
        for cleanup in self._cleanups:
            cleanup()

    @property
    def closed(self) -> bool:
        return self._core.closed

    # Memory

    @property
    def memory_regions(self) -> list[tuple[int, int]]:
        """``(guest_addr, size)`` of each RAM region, in address order."""
        return self._core.memory_regions

    def mem_read(self, addr: int, size: int) -> bytes:
        """Copies ``size`` bytes of guest memory at ``addr`` (showing the original bytes where
        software breakpoints are)."""
        return self._debug.hide(addr, self._core.mem_read(addr, size))

    def mem_write(self, addr: int, data: Buffer) -> None:
        """Copies ``data`` (any bytes-like object) into guest memory at ``addr``."""
        self._core.mem_write(addr, data)

    def mem_view(self, addr: int, size: int) -> memoryview:
        """A writable zero-copy view of guest memory inside one region. It keeps the memory
        mapped while it exists, even after :meth:`close`."""
        return memoryview(self._core.mem_view(addr, size))

    # I/O

    def hook_io(
        self, port: int, size: int = 1, read: ReadHandler | None = None, write: WriteHandler | None = None
    ) -> None:
        """Serves ports ``[port, port + size)`` from Python. ``addr`` passed to the handlers is
        the port accessed. A missing handler acts like an empty bus; a handler that is not
        callable raises ``TypeError`` here.

        What the handlers see:

        - Each ``in``/``out`` is one call with its size (1, 2 or 4). A string instruction
          (``rep insb``, ``outsw``, ...) is one call per element, in order, as the CPU makes them.
        - An access only part of which the range covers (a 4-byte ``out`` to a range of one port,
          say) reaches no handler: the run ends with ``HANDLER_ERROR`` naming the access and the
          range, whatever ``unhandled_io`` says. Hook a range that covers the accesses the guest
          makes.
        - When a handler raises (the exception comes out of :meth:`run` or :meth:`wait`), the
          guest has not finished the instruction: resuming the run makes the access again and
          calls the handler again. So does an unhandled access that ended the run. An exception
          in the middle of a string instruction repeats the elements of it already served."""
        self._core.add_handler("pio", port, size, read, write)

    def hook_mmio(
        self, addr: int, size: int, read: ReadHandler | None = None, write: WriteHandler | None = None
    ) -> None:
        """Serves guest physical ``[addr, addr + size)`` from Python. The range must not overlap
        guest RAM, whose accesses never leave the guest (:class:`~kvmkit.errors.ConfigError`
        otherwise). Each access is one call with its size (1 to 8 bytes). As for
        :meth:`hook_io`, handlers must be callable, an access only partly inside the range ends
        the run with ``HANDLER_ERROR``, and an access whose handler raised is made again when
        the run resumes."""
        self._core.add_handler("mmio", addr, size, read, write)

    def add_io_device(self, port: int, size: int, device: Device) -> None:
        """Serves ports ``[port, port + size)`` with a Rust device from :mod:`kvmkit.devices`."""
        self._core.add_device("pio", port, size, device)

    def add_mmio_device(self, addr: int, size: int, device: Device) -> None:
        """Serves MMIO ``[addr, addr + size)`` with a Rust device from :mod:`kvmkit.devices`."""
        self._core.add_device("mmio", addr, size, device)

    def unhook_io(self, port: int) -> None:
        """Removes the port range that starts at ``port``."""
        self._core.remove("pio", port)

    def unhook_mmio(self, addr: int) -> None:
        """Removes the MMIO range that starts at ``addr``."""
        self._core.remove("mmio", addr)

    @property
    def stats(self) -> dict[str, int]:
        """Counts of I/O exits: ``io_exits``, ``mmio_exits``, ``unhandled_io``, ``unhandled_mmio``."""
        return self._core.stats

    # virtio devices

    def add_disk(
        self,
        path: str | os.PathLike[str],
        read_only: bool = False,
        *,
        serial: str | None = None,
        lock: bool = True,
    ) -> Disk:
        """Adds a virtio disk backed by the raw image file at ``path`` (its size must be a multiple
        of 512 bytes). ``read_only`` tells the guest so and fails its writes; ``serial`` is the id
        the guest reads (at most 20 ASCII bytes; by default one derived from the file).

        The image is locked while the VM has it (``flock``): shared when ``read_only``, else
        exclusive, so a read-write disk cannot share its image with any other disk, nor a read-only
        one with a writer. :class:`~kvmkit.errors.ImageLockedError` says when the lock is held
        elsewhere; ``lock=False`` neither takes nor respects it."""
        backend = _core.virtio_block(path, read_only, serial, lock)
        disk = self._keep(Disk(self._add_virtio(backend), os.fspath(path), read_only))
        self._setup.append(
            {"kind": "block", "path": disk.path, "read_only": read_only, "serial": serial, "lock": lock}
        )
        return disk

    def add_net(self, tap: str, mac: str | None = None) -> Net:
        """Adds a virtio network card on the Linux tap ``tap``: an existing tap this user may open,
        or a new one when the process has CAP_NET_ADMIN (a ``%d`` in the name lets the kernel
        number it). ``mac`` defaults to a random locally administered address. Checksum and
        segmentation offloads are offered to the guest when the tap supports them."""
        return self._add_net(tap, mac)

    def _add_net(self, tap: str | None, mac: str | None) -> Net:
        """A card on ``tap``, or with no back end and its link down when ``tap`` is None."""
        net = self._keep(Net(self._add_virtio(_core.virtio_net(tap, mac))))
        self._setup.append({"kind": "net", "tap": net.tap, "mac": net.mac})
        return net

    def add_vsock(self, cid: int, uds_path: str | os.PathLike[str]) -> Vsock:
        """Adds a virtio vsock device giving the guest context id ``cid`` (3 or more), with its
        host side on the Unix socket ``uds_path``, which must not exist yet (see
        :class:`kvmkit.virtio.Vsock`)."""
        backend = _core.virtio_vsock(cid, uds_path)
        vsock = self._keep(Vsock(self._add_virtio(backend), cid, os.fspath(uds_path)))
        self._setup.append({"kind": "vsock", "cid": cid, "uds_path": vsock.uds_path})
        return vsock

    def add_rng(self) -> Rng:
        """Adds a virtio entropy device fed by the host's ``getrandom``."""
        rng = self._keep(Rng(self._add_virtio(_core.virtio_rng())))
        self._setup.append({"kind": "rng"})
        return rng

    def _keep(self, device: _Device) -> _Device:
        self._virtio.append(device)
        return device

    def _add_virtio(self, backend: _core.VirtioBackend) -> _core.VirtioHandle:
        if self._console is not None:
            raise VmStateError("add virtio devices before boot_linux, which tells the kernel about them")
        handle = self._core.add_virtio(backend)
        log.debug("added virtio %s at %#x, irq %d", handle.kind, handle.address, handle.irq)
        return handle

    @property
    def virtio_devices(self) -> list[VirtioDevice]:
        """The virtio devices added so far, in order."""
        return list(self._virtio)

    # Linux

    def boot_linux(
        self,
        kernel: str | os.PathLike[str] | bytes,
        initrd: str | os.PathLike[str] | bytes | None = None,
        cmdline: str = DEFAULT_CMDLINE,
    ) -> Console:
        """Loads a Linux kernel (bzImage, or ELF ``vmlinux`` entered through PVH when it has the
        note for it) with its initrd and command line, sets up the PC platform around it (MP
        and ACPI tables, COM1 console, i8042, ACPI sleep control, CMOS RTC, boot timer) and points
        vCPU 0 at its entry. Needs ``irqchip=True``. Returns the console, also at :attr:`console`;
        :meth:`run` or :meth:`start` boots."""
        self._core.boot_linux(_image(kernel), None if initrd is None else _image(initrd), cmdline)
        self._console = Console(self._core)
        self._setup.append({"kind": "linux"})
        return self._console

    @property
    def console(self) -> Console:
        """The Linux guest's serial console (after :meth:`boot_linux`)."""
        if self._console is None:
            raise VmStateError("no Linux kernel was loaded into this VM (see boot_linux)")
        return self._console

    @property
    def boot_time(self) -> float | None:
        """Seconds from the first start until the guest's init wrote to the boot timer."""
        return self._core.boot_time

    # The guest agent

    @property
    def agent(self) -> Agent:
        """The client of the guest agent (:mod:`kvmkit.agent`) on the VM's first vsock device.
        Raises :class:`~kvmkit.errors.AgentError` when the VM has no vsock device."""
        if self._agent is None:
            vsock = next((device for device in self._virtio if isinstance(device, Vsock)), None)
            if vsock is None:
                raise AgentError(
                    "this VM has no vsock device, which the guest agent needs: add one with "
                    "add_vsock(cid, uds_path) before boot_linux"
                )
            me = weakref.ref(self)  # the agent must not keep its VM alive
            self._agent = Agent(vsock, alive=lambda: (vm := me()) is not None and vm.running)
        return self._agent

    def exec(
        self,
        command: Command,
        *,
        input: Buffer | str | None = None,
        timeout: float | None = None,
        check: bool = False,
    ) -> ExecResult:
        """Runs ``command`` in the guest through its agent (kvmkit's default guest runs one; the VM
        needs a vsock device): a str through ``/bin/sh -c``, a list as argv, with ``input`` on its
        stdin. Returns ``ExecResult(stdout, stderr, status)``. Waits for the agent to come up, for
        ``timeout`` seconds at most when given (the whole call; the command is killed at the end
        of it and :class:`~kvmkit.errors.AgentTimeout` raised). ``check=True`` raises
        :class:`~kvmkit.errors.CommandFailed` for a non-zero status. See
        :meth:`kvmkit.agent.Agent.exec`."""
        return self.agent.exec(command, input=input, timeout=timeout, check=check)

    def put_file(
        self, path: PathArg, data: Buffer | str, mode: int = 0o644, *, timeout: float | None = None
    ) -> None:
        """Writes ``data`` to the guest file ``path`` (created or truncated, given ``mode``)
        through the guest agent."""
        self.agent.put_file(path, data, mode, timeout=timeout)

    def get_file(self, path: PathArg, *, timeout: float | None = None) -> bytes:
        """The contents of the guest file ``path``, read through the guest agent. A file the guest
        cannot read raises :class:`~kvmkit.errors.GuestOSError` with its errno."""
        return self.agent.get_file(path, timeout=timeout)

    def mem_read_virtual(self, vcpu: Vcpu | int, vaddr: int, size: int) -> bytes:
        """Copies ``size`` bytes at the virtual address ``vaddr`` as ``vcpu``'s page tables map
        it, page by page. Raises ``ConfigError`` at the first page not mapped."""
        index = vcpu if isinstance(vcpu, int) else vcpu.index
        return self._core.mem_read_virtual(index, vaddr, size)

    def mem_write_virtual(self, vcpu: Vcpu | int, vaddr: int, data: Buffer) -> None:
        """Copies ``data`` to the virtual address ``vaddr`` as ``vcpu``'s page tables map it,
        page by page. Raises ``ConfigError`` (writing nothing) if a page is not mapped."""
        index = vcpu if isinstance(vcpu, int) else vcpu.index
        self._core.mem_write_virtual(index, vaddr, data)

    # Debugging

    def add_breakpoint(self, addr: int, hardware: bool = False) -> Breakpoint:
        """Stops runs before the instruction at the linear address ``addr`` runs, on every
        vCPU; the run ends with ``ExitReason.DEBUG`` (``details["kind"] == "breakpoint"``) unless
        the :meth:`on_debug` callback continues it. Running again goes on past it. The VM must be
        stopped.

        Hardware breakpoints share the four debug registers with watchpoints (``ConfigError``
        beyond). Software ones (any number) patch an ``int3`` at the address vCPU 0's page tables
        map ``addr`` to now; :meth:`mem_read` shows the original byte (:meth:`mem_view` does not).
        They need a KVM that lets ``int3`` exit (not the paravirtualized ``kvm_pvm``)."""
        if hardware:
            return self._debug.add_breakpoint(addr)
        physical = self.vcpus[0].translate(addr)
        if physical is None:
            raise ConfigError(f"{addr:#x} is not mapped on vCPU 0")
        return self._debug.add_software_breakpoint(addr, physical)

    def add_watchpoint(self, addr: int, length: int, access: WatchAccess = "write") -> Watchpoint:
        """Stops runs right after an instruction writes (``access="write"``) or reads or writes
        (``"readwrite"``) the ``length`` bytes (1, 2, 4 or 8, aligned) at the linear address
        ``addr``, on every vCPU. Uses one of the four debug registers. The VM must be stopped."""
        if access not in ("write", "readwrite"):
            raise ConfigError(f'access must be "write" or "readwrite", not {access!r}')
        return self._debug.add_watchpoint(addr, length, access)

    def on_debug(self, callback: DebugCallback | None) -> None:
        """Calls ``callback(vcpu, event)`` on each breakpoint or watchpoint hit that ends a run
        of :meth:`run` or :meth:`wait`; it returns True to continue the run (past the hit) or
        False to end it with the event. Its exceptions are raised from ``run``/``wait``. None
        removes it."""
        self._debug.callback = callback

    def serve_gdb(
        self,
        address: str = "127.0.0.1:1234",
        wait: bool = False,
        breakpoints: BreakpointMode = "auto",
        *,
        reverse: bool = False,
    ) -> GdbServer:
        """Serves gdb (``target remote HOST:PORT``) on ``address`` (port 0: any free one, see
        :attr:`~kvmkit.gdb.GdbServer.port`) from a thread of its own; with ``wait``, returns once
        a client has attached, with the VM stopped under its control (as QEMU's ``-s -S``). Every
        vCPU is a gdb thread; gdb gets the registers (segment bases, control registers and EFER
        too), memory by virtual address, single-step, breakpoints (``breakpoints`` says how
        ``break`` sets them, see :data:`kvmkit.gdb.BreakpointMode`) and read, write and access
        watchpoints. While a client is attached it drives the VM: leave running and stepping it
        to gdb until :meth:`~kvmkit.gdb.GdbServer.wait_detached`. See
        :class:`~kvmkit.gdb.GdbServer`.

        ``reverse=True`` (a VM of one vCPU) lets gdb go back: ``reverse-stepi`` and
        ``reverse-continue`` (and the ``reverse-*`` commands built on them). A session then runs
        the guest one single step at a time, continues included, and counts the instructions
        from where it first ran it; going back restores that state in place and runs forward
        again to the instruction wanted, so it needs a guest that runs the same way twice (no
        interrupts or clock; Python handlers are called again and must answer the same).
        Breakpoints are then checked against RIP after each step (no ``int3``, no debug
        register); a change of registers or memory from gdb starts the recording afresh."""
        if breakpoints not in ("auto", "hardware", "software"):
            raise ConfigError(f'breakpoints must be "auto", "hardware" or "software", not {breakpoints!r}')
        server = GdbServer(self._core.serve_gdb(address, wait, breakpoints, reverse))
        self._gdb_servers = [*(s for s in self._gdb_servers if not s.closed), server]
        return server

    # Running

    def run(
        self, timeout: float | None = None, *, until: int | None = None, count: int | None = None
    ) -> Exit:
        """Runs every vCPU, each on its own thread, until the run ends and returns how it ended.
        After ``timeout`` seconds the VM is stopped and the reason is ``TIMEOUT``. An exception
        raised by a handler during the run is raised here; Ctrl-C stops the VM and raises
        ``KeyboardInterrupt``. A timeout or Ctrl-C returns within about 0.1 s even while a handler
        is busy; that handler's call finishes on its own thread, and until it has the VM is still
        running (``vcpu_reasons`` is then empty; :meth:`wait` collects the full exit). The VM can
        be run again, resuming where it stopped.

        Like Unicorn's ``emu_start(begin, until, timeout, count)``: with ``until``, the run also
        ends when a vCPU is about to execute the instruction at that (linear) address, with
        ``ExitReason.DEBUG`` of kind ``"breakpoint"`` (a hardware breakpoint, for the run only);
        with ``count``, the VM's only vCPU runs that many instructions, one step each, on the
        calling thread, ending with the last step's exit (``DEBUG`` of kind ``"step"``) or earlier
        on any other exit."""
        check_timeout(timeout)
        if count is not None:
            return self._run_count(count, timeout)
        if until is not None:
            stop_at = self.add_breakpoint(until, hardware=True)
            try:
                return self.run(timeout)
            finally:
                stop_at.remove()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ended = self._step_over_software()
            if ended is not None:
                return ended
            exit_ = self._debug.describe(Exit._from_core(self._core.run(left)))
            log.debug("run ended: %s", exit_)
            if not self._debug.should_continue(exit_, self.vcpus):
                return exit_

    def _run_count(self, count: int, timeout: float | None) -> Exit:
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigError(f"count must be a positive number of instructions, not {count!r}")
        if len(self.vcpus) != 1:
            raise ConfigError(
                f"run(count=...) steps the VM's only vCPU, and this VM has {len(self.vcpus)}: "
                "use vcpus[i].step() for one of them"
            )
        exit_ = self._debug.describe(Exit._from_core(self._core.step(0, True, count, timeout)))
        log.debug("run of %d instructions ended: %s", count, exit_)
        return exit_

    @property
    def current_vcpu(self) -> Vcpu | None:
        """In a handler, the vCPU whose access it serves (``None`` elsewhere). Its registers can
        be read and changed from the handler: ``vm.current_vcpu.reg_read("rip")`` is the address
        of the instruction making the access. KVM completes the access when the run goes on: an
        ``in`` still writes its register, and a new RIP cancels the rest of the instruction."""
        index = self._core.current_vcpu
        return None if index is None else self.vcpus[index]

    def start(self) -> None:
        """Starts every vCPU on its own thread and returns at once."""
        if self._step_over_software() is not None:
            # The run ended in the step over a software breakpoint; run it again to go on.
            return
        self._core.start()
        self._debug.started = True

    def _step_over_software(self) -> Exit | None:
        """Steps the vCPUs stopped on software breakpoints past them; returns the exit if such a
        step ends the run (a watchpoint hit, a failure)."""
        for cpu in self.vcpus:
            exit_ = self._debug.step_over_software(cpu)
            if (
                exit_ is not None
                and exit_.reason is not ExitReason.HLT
                and exit_.details.get("kind") != "step"
            ):
                return exit_
        return None

    def wait(self, timeout: float | None = None) -> Exit:
        """Waits for the run to end. Raises :class:`~kvmkit.errors.WaitTimeout` if it has not
        after ``timeout`` seconds (the VM keeps running), and ``VmStateError`` when called from a
        handler of the run, whose vCPU would wait for itself."""
        exit_ = self._wait(timeout)
        if exit_ is None:
            raise WaitTimeout(f"the VM is still running after {timeout} s")
        return exit_

    def _wait(self, timeout: float | None) -> Exit | None:
        check_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            raw = self._core.wait(left)
            if raw is None:
                return None
            exit_ = self._debug.describe(Exit._from_core(raw))
            log.debug("run ended: %s", exit_)
            # Only the run start() began goes to the callback, not a later wait() for the same end.
            started, self._debug.started = self._debug.started, False
            if not (started and self._debug.should_continue(exit_, self.vcpus)):
                return exit_
            self.start()

    async def run_async(self, timeout: float | None = None) -> Exit:
        """:meth:`run` for asyncio: starts the VM and waits for the run to end without blocking
        the event loop (it watches an eventfd the VM signals when a run ends). After ``timeout``
        seconds the VM is stopped and the reason is ``TIMEOUT``; cancelling the task stops the VM."""
        check_timeout(timeout)
        self.start()
        try:
            return await self.wait_async(timeout)
        except WaitTimeout:
            self._core.stop(True)
            return await self.wait_async()
        except asyncio.CancelledError:
            self.stop()
            raise

    async def wait_async(self, timeout: float | None = None) -> Exit:
        """:meth:`wait` for asyncio, driven by the eventfd the VM signals when a run ends, not by
        polling. Raises :class:`~kvmkit.errors.WaitTimeout` after ``timeout`` seconds (the VM keeps
        running), and the exception a handler raised during the run."""
        check_timeout(timeout)
        try:
            return await asyncio.wait_for(self._run_end(), timeout)
        except asyncio.TimeoutError as error:
            raise WaitTimeout(f"the VM is still running after {timeout} s") from error

    async def _run_end(self) -> Exit:
        fd = self._core.run_end_fd
        while True:
            exit_ = self._wait(0.0)
            if exit_ is not None:
                return exit_
            await _aio.readable([fd])  # then the run's end is collected above

    async def __aenter__(self) -> VM:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def stop(self) -> bool:
        """Ends the run from any thread, or from a handler; returns whether it was running."""
        return self._core.stop()

    @property
    def running(self) -> bool:
        return not self.closed and self._core.running

    @property
    def last_exit(self) -> Exit | None:
        """How the last finished run ended."""
        raw = self._core.last_exit
        return None if raw is None else self._debug.describe(Exit._from_core(raw))

    # Pause, snapshot, restore, fork

    def pause(self) -> None:
        """Stops the VM with every vCPU's last instruction complete, and freezes its devices (no
        device touches memory or raises an interrupt) and the guest's clock (the guest sees no
        time pass) until :meth:`resume`. A run in progress ends with ``ExitReason.PAUSED``.
        Pausing a stopped or paused VM only freezes it."""
        self._core.pause()

    def resume(self) -> None:
        """Continues a paused VM in the background, as :meth:`start` does (:meth:`run` and
        :meth:`start` resume a paused VM too)."""
        self._core.resume()

    @property
    def paused(self) -> bool:
        return self._core.paused

    def snapshot(self) -> Snapshot:
        """The whole state of the stopped or paused VM (see :mod:`kvmkit.snapshot`). The first
        snapshot moves guest memory into a memory file the VM then maps copy-on-write; later ones
        copy only the pages written since. Software breakpoints are left out: the snapshot holds
        the original bytes."""
        with self._debug.unpatched():
            core = self._core.snapshot()
        return Snapshot(core, {"version": SETUP_VERSION, "devices": list(self._setup)})

    def restore(self, snapshot: Snapshot) -> None:
        """Puts the stopped or paused VM back to ``snapshot`` (taken from this VM, from the VM it
        was forked from, or loaded from files of a VM of the same configuration and devices),
        copying back only the memory pages written since. The guest's clock moves on by the time
        passed since the snapshot, so its wall clock stays right. Repeatable any number of times;
        :attr:`last_restore` says what it took. Software breakpoints stay set (over the restored
        bytes)."""
        self._core.restore(snapshot._core)
        self._debug.repatch()

    @property
    def last_restore(self) -> dict[str, float] | None:
        """How long each part of the last :meth:`restore` took, in microseconds (``memory_us``,
        ``vm_us``, ``vcpus_us``, ``devices_us``), and ``pages_copied``."""
        return self._core.last_restore

    @classmethod
    def from_snapshot(
        cls,
        snapshot: Snapshot | str | os.PathLike[str],
        *,
        vsock_uds_paths: Sequence[str] | None = None,
        net: str | Sequence[str] | None = None,
        new_mac: bool = False,
        prepare: Callable[[VM], object] | None = None,
    ) -> VM:
        """A new VM in the state of ``snapshot`` (a :class:`Snapshot`, or the directory one was
        saved to), stopped; :meth:`run` or :meth:`start` continues it. Memory is the snapshot's,
        mapped copy-on-write and read as the guest touches it, so this is fast whatever the memory
        size. Devices are built again as the snapshot describes them; each vsock device needs a
        Unix socket path that does not exist yet: its old one, or the next of ``vsock_uds_paths``.
        Network cards go back on their saved taps (a card saved without one stays without), unless
        ``net`` says otherwise: ``"none"`` for cards without a back end, their link down (see
        :meth:`fork`), or a tap name (a ``%d`` in it numbered by the kernel), or a list of one tap
        name per card. ``new_mac=True`` gives each card a new random MAC (see :meth:`fork`).
        Python handlers and the devices added with :meth:`add_io_device` or :meth:`add_mmio_device`
        are not rebuilt: ``prepare(vm)``, called before the state is restored, adds them again
        (a device that saved state must then be at its old place, or the restore raises
        :class:`~kvmkit.errors.SnapshotMismatchError`)."""
        if not isinstance(snapshot, Snapshot):
            snapshot = Snapshot.load(snapshot)
        paths = iter(vsock_uds_paths or ())
        cards = _net_cards(snapshot._setup)
        taps = None if net is None else _net_plan(cards, net if isinstance(net, str) else [net], 1)[0]
        devices = _CloneDevices(lambda device: next(paths, device["uds_path"]), taps, new_mac)
        return cls._clone(snapshot, devices, prepare)

    def fork(
        self,
        count: int | None = None,
        *,
        net: NetChoice = "none",
        new_mac: bool = False,
        disks: Literal["refuse", "copy"] = "refuse",
        prepare: Callable[[VM], object] | None = None,
    ) -> VM | list[VM]:
        """New VMs in this process that start from this VM's current state and share its memory
        copy-on-write; this VM goes on as it was (a running one is paused for the snapshot and
        resumed). ``fork()`` returns one VM, ``fork(n)`` a list of ``n``. Per device: read-only
        disks are shared; a vsock device gets its own socket, ``<uds_path>.fork<N>``. Python
        handlers and devices added with :meth:`add_io_device`/:meth:`add_mmio_device` are not
        copied: ``prepare(clone)`` adds them, as for :meth:`from_snapshot`.

        A writable disk cannot be shared: clones would write over each other and the parent. With
        ``disks="refuse"`` (the default) it makes the fork fail with
        :class:`~kvmkit.errors.ConfigError`; with ``disks="copy"`` each clone gets a copy of its
        own, ``<image>.fork<N>``, taken while this VM is paused for the snapshot, so it holds what
        the guest had written then: a reflink, which shares the file's blocks copy-on-write,
        where the file system has them (btrfs, XFS), else a copy of the file's data (its holes
        stay holes). The clone deletes its copies when it is closed or collected.

        Network cards cannot share the parent's tap. Each clone's card is at the same address as
        the parent's, and ``net`` says what is behind it:

        - ``"none"`` (the default, as it needs no privilege and cannot put two VMs on one
          network by surprise): nothing. The card reports its link down (the guest's driver
          is told by a configuration-change interrupt when the clone first runs), drops what the
          guest sends (counted as failed requests in its ``stats``) and receives nothing.
        - a list with one entry per clone: the tap that clone's card goes on (an existing tap, or
          a new one with CAP_NET_ADMIN), or ``"none"``; for a VM with several cards, each entry
          is a list of one tap name per card.
        - a tap name with ``%d``, which the kernel numbers: a new tap for every card of every
          clone (needs CAP_NET_ADMIN). A name without ``%d`` fits a single clone of one card.

        A wrong number of taps raises :class:`~kvmkit.errors.ConfigError`. The card's state goes
        onto the new tap; a tap lacking an offload the guest's driver accepted fails the fork with
        :class:`~kvmkit.errors.SnapshotMismatchError` saying so.

        ``new_mac=True`` gives each clone's cards a new random locally administered MAC
        (``clone.virtio_devices[i].mac``) in their configuration space. A running Linux guest
        reads the MAC only when its driver probes, and its configuration-change handler looks
        only at the link status and announce bits, so the guest keeps the parent's MAC until
        told, for instance ``clone.exec(f"ip link set dev eth0 address {clone.virtio_devices[i].mac}")``."""
        if disks not in ("refuse", "copy"):
            raise ConfigError(f'disks must be "refuse" or "copy", not {disks!r}')
        writable = [d["path"] for d in self._setup if d["kind"] == "block" and not d["read_only"]]
        if writable and disks == "refuse":
            raise ConfigError(
                f"cannot fork a VM with the writable disk {writable[0]}: clones would share its "
                'writes; fork(disks="copy") gives each clone a copy, or add the disk read_only'
            )
        plan = _net_plan(_net_cards({"devices": self._setup}), net, 1 if count is None else count)
        was_running = self.running and not self.paused
        if was_running:
            self.pause()
        copies: list[dict[str, str]] = []
        try:
            snapshot = self.snapshot()
            for _ in plan:
                number = next(_fork_numbers)
                copies.append({path: f"{path}.fork{number}" for path in writable})
                for path, copy in copies[-1].items():
                    _copy_image(path, copy)
        except BaseException:
            _remove_files([copy for clone in copies for copy in clone.values()])
            raise
        finally:
            if was_running:
                self.resume()
        clones: list[VM] = []
        try:
            for taps, disk_copies in zip(plan, copies):
                devices = _CloneDevices(
                    lambda device: f"{device['uds_path']}.fork{next(_fork_numbers)}",
                    taps,
                    new_mac,
                    disk_copies,
                )
                clones.append(VM._clone(snapshot, devices, prepare))
                clones[-1]._cleanups.append(
                    weakref.finalize(clones[-1], _remove_files, list(disk_copies.values()))
                )
        except BaseException:
            for clone in clones:
                clone.close()
            _remove_files([copy for clone in copies for copy in clone.values()])
            raise
        return clones[0] if count is None else clones

    @classmethod
    def _clone(
        cls, snapshot: Snapshot, devices: _CloneDevices, prepare: Callable[[VM], object] | None = None
    ) -> VM:
        vm = cls.__new__(cls)
        vm._adopt(_core.Vm.from_snapshot(snapshot._core), snapshot.cpus)
        try:
            for device in snapshot._setup.get("devices", []):
                vm._add_from_setup(device, devices)
            if prepare is not None:
                prepare(vm)
            vm._core.restore(snapshot._core)
        except BaseException:
            vm.close()
            raise
        log.debug("made a VM from %r", snapshot)
        return vm

    def _add_from_setup(self, device: dict[str, Any], devices: _CloneDevices) -> None:
        kind = device.get("kind")
        if kind == "block":
            path = devices.disk_copies.get(device["path"], device["path"])
            self.add_disk(path, device["read_only"], serial=device["serial"], lock=device["lock"])
        elif kind == "net":
            self._add_net(devices.net_tap(device), None if devices.new_mac else device["mac"])
        elif kind == "vsock":
            self.add_vsock(device["cid"], devices.vsock_path(device))
        elif kind == "rng":
            self.add_rng()
        elif kind == "linux":
            self._core.attach_linux()
            self._console = Console(self._core)
            self._setup.append(device)
        else:
            raise SnapshotFormatError(f"the snapshot names a device kvmkit does not know: {device!r}")


class _CloneDevices:
    """How a clone's devices differ from those the snapshot describes."""

    def __init__(
        self,
        vsock_path: Callable[[dict[str, Any]], str],
        taps: list[str | None] | None,
        new_mac: bool,
        disk_copies: dict[str, str] | None = None,
    ) -> None:
        self.vsock_path = vsock_path
        """The socket path of a vsock device."""
        self.disk_copies = disk_copies or {}
        """The clone's own copy of each writable disk, by the image it copies."""
        self._taps = None if taps is None else iter(taps)
        self.new_mac = new_mac
        """Whether network cards get new MAC addresses."""

    def net_tap(self, device: dict[str, Any]) -> str | None:
        """The tap of the next network card: the planned one, else the saved one (None for a card
        with no back end)."""
        saved: str | None = device["tap"]
        return saved if self._taps is None else next(self._taps)


# ioctl(dest, FICLONE, source): share all of source's blocks copy-on-write (btrfs, XFS).
_FICLONE = 0x40049409


def _copy_image(source: str, dest: str) -> None:
    """Copies the disk image ``source`` to ``dest`` (which must not exist): a reflink where the
    file system has them, else its data, region by region, leaving its holes as holes."""
    with open(source, "rb") as src, open(dest, "xb") as dst:
        try:
            fcntl.ioctl(dst.fileno(), _FICLONE, src.fileno())
            return
        except OSError:
            pass
        size = os.fstat(src.fileno()).st_size
        offset = 0
        while offset < size:
            try:
                start = os.lseek(src.fileno(), offset, os.SEEK_DATA)
            except OSError:  # ENXIO: nothing but a hole from here on
                break
            end = os.lseek(src.fileno(), start, os.SEEK_HOLE)
            while start < end:
                copied = os.copy_file_range(src.fileno(), dst.fileno(), end - start, start, start)
                if copied == 0:  # the file shrank under us
                    break
                start += copied
            offset = end
        dst.truncate(size)


def _remove_files(paths: list[str]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _net_cards(setup: dict[str, Any]) -> int:
    return sum(1 for device in setup.get("devices", []) if device.get("kind") == "net")


def _net_plan(cards: int, net: NetChoice, clones: int) -> list[list[str | None]]:
    """The tap of each card of each clone (None for no back end), as ``net`` says; see
    :meth:`VM.fork`."""

    def tap(name: str) -> str | None:
        return None if name == "none" else name

    if isinstance(net, str):
        if net == "none" or "%d" in net or clones * cards <= 1:
            return [[tap(net)] * cards for _ in range(clones)]
        raise ConfigError(
            f"{clones * cards} network cards cannot share the tap {net}: "
            "give a list with one tap per clone, or a name with %d"
        )
    if isinstance(net, bytes) or not isinstance(net, Sequence):
        raise ConfigError(f'net must be "none", a tap name or a list of them, not {type(net).__name__}')
    if len(net) != clones:
        raise ConfigError(f"net names {len(net)} taps for {clones} clone(s); give one per clone")
    plan = []
    for entry in net:
        names = [entry] * cards if isinstance(entry, str) and (entry == "none" or cards == 1) else entry
        if isinstance(names, str) or not isinstance(names, Sequence) or len(names) != cards:
            raise ConfigError(f"the VM has {cards} network card(s), and net gives {entry!r} for a clone")
        if not all(isinstance(name, str) for name in names):
            raise ConfigError(f"tap names must be strings, not {entry!r}")
        plan.append([tap(name) for name in names])
    return plan


@atexit.register
def _close_all() -> None:
    # vCPU threads must not call into an interpreter that is shutting down.
    for vm in list(_live):
        vm.close()
