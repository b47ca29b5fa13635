"""The ``kvmkit`` command."""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import kvmkit
from kvmkit.errors import ConfigError, KvmkitError, NestedError
from kvmkit.exits import Exit, ExitReason

if TYPE_CHECKING:
    from kvmkit.gdb import GdbServer
    from kvmkit.nested import HostKvm

# How a Linux guest ends itself on kvmkit's platform: `poweroff` (ACPI S5) or `reboot` (the
# i8042's reset line, with reboot=k).
_GUEST_SHUTDOWN = (ExitReason.POWEROFF, ExitReason.RESET)


def _demo(args: argparse.Namespace) -> int:
    from kvmkit import nested
    from kvmkit.demo import run_linux

    kvm = nested.host_kvm()
    if kvm is not nested.HostKvm.HARDWARE and not args.here:
        return _demo_in_nested_machine(args, kvm)
    result = run_linux(args.command, cpus=args.cpus)
    print(f"\n[kvmkit] guest stopped: {result.exit} after {result.seconds:.1f} s")
    if result.command_output is not None:
        print(f"[kvmkit] `{args.command}` printed on the console: {result.command_output.strip()}")
        if result.exec_result is None:
            print("[kvmkit] the guest agent did not answer")
            return 1
        done = result.exec_result
        print(
            f"[kvmkit] vm.exec({args.command!r}) through the guest agent: status {done.status}, "
            f"stdout {done.stdout.decode(errors='replace').strip()!r}"
        )
        return 0 if result.exit.reason in _GUEST_SHUTDOWN else 1
    print(f"[kvmkit] the guest stopped early; furthest boot milestone: {result.milestone or 'none'}")
    if kvm is nested.HostKvm.PARAVIRTUAL:
        print(
            "[kvmkit] this host's KVM is paravirtualized (kvm_pvm): it emulates parts of an unmodified "
            "kernel in software and gives up on some instructions, so Linux cannot boot to a shell "
            "here; without --here the demo runs in the nested machine instead."
        )
        return 0 if result.milestone is not None else 1
    return 1


def _demo_in_nested_machine(args: argparse.Namespace, kvm: HostKvm) -> int:
    from kvmkit import nested
    from kvmkit.images import default_guest

    why = "has no usable /dev/kvm" if kvm is nested.HostKvm.MISSING else "has a paravirtualized KVM (kvm_pvm)"
    print(
        f"[kvmkit] this host {why}, which cannot boot an unmodified Linux guest to its shell; running the "
        "demo in the nested machine: QEMU's emulated AMD CPU with kvm_amd, a KVM with hardware semantics "
        "(everything runs about 15 times slower in there)",
        flush=True,
    )
    default_guest()  # built here: the nested machine sees this host's files read-only
    command = [
        sys.executable,
        "-m",
        "kvmkit",
        "demo",
        "--here",
        "--command",
        args.command,
        "--cpus",
        str(args.cpus),
    ]
    return nested.run(command, timeout=args.timeout)


def _hello(args: argparse.Namespace) -> int:
    from kvmkit.demo import run_greeting

    result = run_greeting(args.name)
    sys.stdout.write(result.output)
    print(
        f"[kvmkit] guest stopped: {result.exit.reason.value} after {result.io_exits} port exits "
        f"in {result.seconds * 1e3:.2f} ms"
    )
    return 0 if result.exit.reason is ExitReason.HLT else 1


# What `kvmkit run` exits with, by how the guest ended.
_RUN_STATUS = {ExitReason.POWEROFF: 0, ExitReason.RESET: 0, ExitReason.STOPPED: 0, ExitReason.HLT: 0}


def _run(args: argparse.Namespace) -> int:
    from kvmkit.terminal import HELP, InputPump, raw_terminal, stdin_fd

    if args.wait and args.gdb is None:
        raise ConfigError("--wait needs --gdb")

    kernel, initrd, default_cmdline = args.kernel, args.initrd, kvmkit.vm.DEFAULT_CMDLINE
    if kernel is None:
        from kvmkit.images import default_guest

        guest = default_guest()
        kernel, initrd, default_cmdline = guest.vmlinux, initrd or guest.initrd, guest.cmdline
    vm = kvmkit.VM(memory=args.memory, cpus=args.cpus, irqchip=True, pit=True)
    with vm:
        _add_devices(vm, args)
        console = vm.boot_linux(kernel, initrd=initrd, cmdline=_cmdline(args, default_cmdline))
        if args.console_log:
            console.log_to(args.console_log)
        console.log_to(sys.stdout)
        server = _serve_gdb(vm, args)

        def quit_() -> None:
            # With gdb attached, stopping the VM would only stop it under gdb.
            if server is not None:
                server.close()
            vm.stop()

        fd = stdin_fd()
        with raw_terminal(fd), InputPump(fd, console.write, quit_):
            if os.isatty(fd):
                sys.stdout.write(HELP)
                sys.stdout.flush()
            exit_ = vm.run() if server is None else _run_under_gdb(vm, server)
    print(f"\r\n[kvmkit] guest stopped: {exit_}", file=sys.stderr)
    if vm.boot_time is not None:
        print(f"[kvmkit] boot time (init's boot-timer write): {vm.boot_time * 1e3:.0f} ms", file=sys.stderr)
    return _RUN_STATUS.get(exit_.reason, 1)


def _serve_gdb(vm: kvmkit.VM, args: argparse.Namespace) -> GdbServer | None:
    """The gdb server ``--gdb`` asks for, once a client attached if ``--wait`` says so."""
    if args.gdb is None:
        return None
    server = vm.serve_gdb(args.gdb)
    host, port = server.address
    print(f"[kvmkit] gdb: target remote {host}:{port}", file=sys.stderr)
    if args.wait:
        print("[kvmkit] waiting for gdb before the first instruction", file=sys.stderr)
        server.wait_attached()
    return server


def _run_under_gdb(vm: kvmkit.VM, server: GdbServer) -> Exit:
    """Runs the VM, leaving it to gdb while a client is attached; returns how it ended with no
    client attached."""
    exit_ = None if server.attached else vm.run()
    # A client that attaches stops the run; once it has gone, the VM runs again (or has ended).
    while exit_ is None or server.attached:
        server.wait_detached()
        exit_ = vm.wait()
    return exit_


def _nested(args: argparse.Namespace) -> int:
    from kvmkit import nested

    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not command:
        raise NestedError("give the command to run after --, e.g. kvmkit nested -- uname -a")
    return nested.run(
        command,
        writable=args.writable,
        timeout=args.timeout,
        cpus=args.cpus,
        memory=args.memory,
    )


def _cmdline(args: argparse.Namespace, default: str) -> str:
    """``--cmdline`` (or the kernel's default command line) with ``--append`` after it."""
    return " ".join(part for part in (args.cmdline or default, *args.append) if part)


def _add_devices(vm: kvmkit.VM, args: argparse.Namespace) -> None:
    for disk in args.disk:
        vm.add_disk(disk.path, read_only=disk.read_only)
    for net in args.net:
        vm.add_net(net.tap, mac=net.mac)
    if args.vsock is not None:
        vm.add_vsock(args.vsock.cid, args.vsock.path)
    if args.rng:
        vm.add_rng()


class _Disk(NamedTuple):
    path: str
    read_only: bool


class _Net(NamedTuple):
    tap: str
    mac: str | None


class _Vsock(NamedTuple):
    cid: int
    path: str


def _options(text: str, what: str, allowed: set[str]) -> tuple[str, dict[str, str]]:
    """Splits ``first,key=value,flag`` into the first field and the options after it."""
    first, *rest = text.split(",")
    options: dict[str, str] = {}
    for item in rest:
        key, _, value = item.partition("=")
        if key not in allowed:
            raise argparse.ArgumentTypeError(
                f"unknown {what} option {key!r} (known: {', '.join(sorted(allowed))})"
            )
        options[key] = value
    if not first:
        raise argparse.ArgumentTypeError(f"{what} needs a value before its options")
    return first, options


def _disk(text: str) -> _Disk:
    path, options = _options(text, "--disk", {"ro"})
    return _Disk(path, "ro" in options)


def _net(text: str) -> _Net:
    tap, options = _options(text, "--net", {"mac"})
    return _Net(tap, options.get("mac"))


def _vsock(text: str) -> _Vsock:
    cid, options = _options(text, "--vsock", {"path"})
    if "path" not in options or not cid.isdigit():
        raise argparse.ArgumentTypeError("--vsock takes CID,path=SOCKET, e.g. 3,path=/tmp/vm.sock")
    return _Vsock(int(cid), options["path"])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvmkit", description="KVM virtual machines from Python.")
    parser.add_argument("--version", action="version", version=f"kvmkit {kvmkit.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="boot the default Linux guest and run a command in it")
    demo.add_argument("--command", default="uname -a", help="the shell command to run (default: uname -a)")
    demo.add_argument("--cpus", type=int, default=2, help="vCPUs (default 2)")
    demo.add_argument(
        "--here",
        action="store_true",
        help="run on this host's KVM even when it cannot boot Linux to a shell (paravirtualized or missing)",
    )
    demo.add_argument(
        "--timeout", type=float, default=1800, help="give up after this many seconds (default 1800)"
    )
    demo.set_defaults(func=_demo)
    hello = commands.add_parser("hello", help="run the bundled greeting guest, raw code served from Python")
    hello.add_argument("--name", default=_user(), help="the name the host tells the guest")
    hello.set_defaults(func=_hello)
    run = commands.add_parser("run", help="boot a Linux kernel with its console on this terminal")
    run.add_argument("--kernel", help="bzImage or vmlinux (default: the default guest's kernel)")
    run.add_argument("--initrd", help="initramfs (default: the default guest's, with --kernel: none)")
    run.add_argument("--cmdline", help="kernel command line (default: the default guest's, or a console one)")
    run.add_argument(
        "--append",
        action="append",
        default=[],
        metavar="ARGS",
        help="add ARGS to the command line instead of replacing it (repeatable)",
    )
    run.add_argument("--memory", default="256M", help="guest memory, e.g. 256M or 1G (default 256M)")
    run.add_argument("--cpus", type=int, default=1, help="vCPUs (default 1)")
    run.add_argument("--console-log", help="also append the console output to this file")
    run.add_argument(
        "--disk",
        type=_disk,
        action="append",
        default=[],
        metavar="IMAGE[,ro]",
        help="a virtio disk backed by a raw image file; ro makes it read-only (repeatable)",
    )
    run.add_argument(
        "--net",
        type=_net,
        action="append",
        default=[],
        metavar="TAP[,mac=MAC]",
        help="a virtio network card on this tap device (repeatable)",
    )
    run.add_argument(
        "--vsock",
        type=_vsock,
        metavar="CID,path=SOCKET",
        help="a virtio vsock device; the host side is the Unix socket SOCKET (CONNECT <port>)",
    )
    run.add_argument("--rng", action="store_true", help="a virtio entropy device")
    run.add_argument(
        "--gdb",
        metavar="HOST:PORT",
        help="serve gdb there (target remote HOST:PORT); an attached gdb drives the VM",
    )
    run.add_argument(
        "--wait", action="store_true", help="with --gdb: wait for gdb before the first instruction"
    )
    run.set_defaults(func=_run)
    nested = commands.add_parser(
        "nested",
        help="run a command on a KVM with hardware semantics, inside an emulated machine",
        description="Boots QEMU's emulated AMD machine with kvm_amd (built once from Debian packages and "
        "cached) and runs CMD there with the host's files (read-only, changes kept in memory), in the "
        "current directory; exits with CMD's status.",
    )
    nested.add_argument(
        "--writable",
        action="append",
        default=[],
        metavar="DIR",
        help="share this host folder read-write, at the same path (repeatable)",
    )
    nested.add_argument("--timeout", type=float, help="stop the machine after this many seconds")
    nested.add_argument("--cpus", type=int, default=1, help="emulated CPUs (default 1)")
    nested.add_argument("--memory", default="4G", help="the machine's memory (default 4G)")
    nested.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ARGS", help="the command to run")
    nested.set_defaults(func=_nested)
    return parser


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "world"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(name)s: %(message)s"
    )
    try:
        return int(args.func(args))
    except KvmkitError as error:
        print(f"kvmkit: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
