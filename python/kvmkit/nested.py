"""The nested machine: a KVM with hardware semantics on any x86-64 Linux host.

QEMU's software emulator (TCG) with an emulated AMD CPU (``-cpu max``: SVM with nested paging)
boots Debian's generic kernel; inside it ``kvm_amd`` gives a ``/dev/kvm`` with standard KVM
semantics, which runs unmodified Linux guests to user space. So kvmkit and programs built on it
run on hosts with no ``/dev/kvm`` at all, or with a paravirtualized one (``kvm_pvm``) that cannot
run a Linux guest to its end.

:func:`run` boots that machine and runs one command in it. The host's root filesystem is shared
read-only (9p) under a RAM-backed overlay, so the command sees the host's programs, virtualenvs
and builds, starts in the current directory and may write anywhere — but only folders named in
``writable`` are shared back to the host, at the same paths. Its output (stdout and stderr
together) streams to the caller; its exit status is returned.

The machine's kernel and initramfs are built once per Debian kernel version from Debian packages
(``linux-image-amd64`` and ``busybox-static``) and cached under ``~/.cache/kvmkit/nested``.
"""

from __future__ import annotations

import enum
import hashlib
import io
import json
import logging
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from kvmkit._core import Initramfs
from kvmkit.errors import ImageError, NestedError, NestedTimeout
from kvmkit.images import (
    BUSYBOX_PACKAGE,
    KernelTree,
    Package,
    build_cached,
    cache_root,
    candidate,
    extract_vmlinux,
    fetch_package,
    module_dir,
    require_tools,
    resolve_kernel,
)
from kvmkit.vm import parse_size

log = logging.getLogger(__name__)

__all__ = ["HostKvm", "NestedImage", "host_kvm", "prepare", "run"]

#: Debian's generic kernel: the cloud flavour has ``kvm_amd`` but no 9p.
KERNEL_METAPACKAGE = "linux-image-amd64"
#: What the machine loads (their dependencies come along): KVM, the 9p shares and the overlay
#: over them, what kvmkit's tests use inside (taps in network namespaces), and the vhost back
#: ends QEMU's network and vsock devices use there (benchmarks/bench_linux_virtio.py).
MODULES = (
    "kvm_amd",
    "9p",
    "9pnet_virtio",
    "virtio_pci",
    "overlay",
    "tun",
    "veth",
    "vhost_net",
    "vhost_vsock",
)
QEMU = "qemu-system-x86_64"
PARAVIRTUAL_KVM = Path("/sys/module/kvm_pvm")
KVM_DEVICE = Path("/dev/kvm")

# The markers /init prints around the command's output, so that the caller sees only the latter.
BEGIN_MARKER = b"kvmkit-nested-begin"
END_MARKER = b"kvmkit-nested-end"
ROOT_TAG = "hostroot"
EXCHANGE_TAG = "exchange"
#: What a cached build holds; part of its cache key, with /init.
IMAGE_LAYOUT = "vmlinux initrd.cpio\n"
#: Exit status of a command that could not be started (as a shell reports it).
NOT_STARTED = 127
#: Seconds the machine may take to boot and start the command before it counts as failed.
BOOT_TIMEOUT = 120.0
#: How much of the command's output a timeout's message repeats, below the CPUs' state.
OUTPUT_TAIL_BYTES = 4096


class HostKvm(enum.Enum):
    """What this host's ``/dev/kvm`` is."""

    HARDWARE = "hardware"
    """KVM on hardware virtualization (or another KVM with its semantics)."""
    PARAVIRTUAL = "paravirtual"
    """``kvm_pvm``: runs small guests, but cannot boot an unmodified Linux guest to its end."""
    MISSING = "missing"
    """No usable ``/dev/kvm``."""


def host_kvm() -> HostKvm:
    """Which kind of KVM this host has."""
    if not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        return HostKvm.MISSING
    return HostKvm.PARAVIRTUAL if PARAVIRTUAL_KVM.exists() else HostKvm.HARDWARE


def inside() -> bool:
    """Whether this process runs inside the nested machine."""
    return os.environ.get("KVMKIT_NESTED") == "1"


@dataclass(frozen=True)
class NestedImage:
    """The nested machine's kernel (an uncompressed ELF ``vmlinux``) and initramfs."""

    kernel: Path
    initrd: Path
    kernel_version: str


def prepare(cache_dir: Path | str | None = None) -> NestedImage:
    """The nested machine's kernel and initramfs, built on first use from Debian packages."""
    try:
        require_tools()
        kernel = resolve_kernel(KERNEL_METAPACKAGE, cache_dir)
        # A change to /init or the modules makes a new build.
        recipe = hashlib.sha256((IMAGE_LAYOUT + _init_script(MODULES)).encode()).hexdigest()[:12]
        target = cache_root(cache_dir) / "nested" / f"{kernel.cache_key}-{recipe}"
        build_cached(target, "the nested machine", lambda staging: _build_into(staging, kernel))
    except ImageError as error:
        raise NestedError(f"cannot build the nested machine: {error}") from error
    return NestedImage(target / "vmlinux", target / "initrd.cpio", kernel.release)


def _build_into(staging: Path, kernel: Package) -> None:
    work = staging / "work"
    kernel_root = fetch_package(kernel, work)
    busybox_root = fetch_package(candidate(BUSYBOX_PACKAGE), work)
    # QEMU boots the uncompressed kernel through PVH, skipping the firmware's decompression of
    # the bzImage, which takes seconds under the emulator.
    bzimage = (kernel_root / "boot" / f"vmlinuz-{kernel.release}").read_bytes()
    (staging / "vmlinux").write_bytes(extract_vmlinux(bzimage))
    tree = KernelTree.load(module_dir(kernel_root, kernel.release))
    modules = tree.load_order(MODULES, needed_by="the nested machine")
    archive = Initramfs()
    for directory in ("bin", "dev", "proc", "sys", "mnt", "tmp"):
        archive.add_dir(directory, 0o755)
    archive.add_char_device("dev/console", 5, 1, 0o600)
    archive.add_file("bin/busybox", (busybox_root / "bin" / "busybox").read_bytes(), 0o755)
    archive.add_symlink("bin/sh", "busybox")
    for path, data in modules:
        archive.add_file(path, data, 0o644)
    archive.add_file("init", _init_script([path for path, _ in modules]).encode(), 0o755)
    (staging / "initrd.cpio").write_bytes(archive.finish())
    shutil.rmtree(work)


def _init_script(modules: Sequence[str]) -> str:
    """The machine's ``/init``: loads KVM, builds the root from the shares, runs the command.

    The exchange share carries ``mounts`` (``TAG PATH`` lines: writable shares and where they go)
    and ``run.sh`` (the command) in; ``status`` (its exit status) or ``error`` (why the machine
    could not run it) back out.
    """
    loads = "".join(f'insmod /{path} || failed="$failed {Path(path).stem}"\n' for path in modules)
    return f"""#!/bin/sh
# /init of kvmkit's nested machine.
export PATH=/bin
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
X=/mnt/exchange
fail() {{ echo "$1" > $X/error; echo "kvmkit-nested: $1" >&2; poweroff -f; }}
mkdir -p $X /mnt/host /mnt/rw /mnt/root
failed=
{loads}mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 {EXCHANGE_TAG} $X || {{
    echo "kvmkit-nested: cannot mount the exchange share" >&2; poweroff -f; }}
[ -z "$failed" ] || fail "cannot load the kernel modules:$failed"
[ -c /dev/kvm ] || fail "kvm_amd is loaded but there is no /dev/kvm (does the emulated CPU have SVM?)"
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose {ROOT_TAG} /mnt/host \\
    || fail "cannot mount the host's root filesystem"
mount -t tmpfs -o mode=0755 tmpfs /mnt/rw
mkdir /mnt/rw/upper /mnt/rw/work
mount -t overlay -o lowerdir=/mnt/host,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work overlay /mnt/root \\
    || fail "cannot mount the overlay on the host's root filesystem"
R=/mnt/root
for dir in proc sys dev; do mount --move /$dir $R/$dir; done
mkdir -p $R/dev/pts $R/dev/shm
# What udev would add to a devtmpfs, and programs expect.
ln -sf /proc/self/fd $R/dev/fd
ln -sf /proc/self/fd/0 $R/dev/stdin
ln -sf /proc/self/fd/1 $R/dev/stdout
ln -sf /proc/self/fd/2 $R/dev/stderr
mount -t devpts -o ptmxmode=0666 devpts $R/dev/pts
mount -t tmpfs tmpfs $R/dev/shm
mount -t tmpfs -o mode=0755 tmpfs $R/run
while read -r tag path; do
    mkdir -p "$R$path" && mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 "$tag" "$R$path" \\
        || fail "cannot mount the writable share $path"
done < $X/mounts
ip link set lo up 2>/dev/null
stty -onlcr -echo 2>/dev/null
echo {BEGIN_MARKER.decode()}
cp $X/run.sh $R/run/kvmkit-nested.sh
chroot $R /bin/sh /run/kvmkit-nested.sh < /dev/null
echo $? > $X/status
echo {END_MARKER.decode()}
poweroff -f
"""


# --------------------------------------------------------------------------- running


@dataclass(frozen=True)
class _Share:
    tag: str
    path: Path


def run(
    command: Sequence[str],
    *,
    cwd: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    writable: Sequence[Path | str] = (),
    timeout: float | None = None,
    cpus: int = 1,
    memory: int | str = "4G",
    output: BinaryIO | None = None,
    cache_dir: Path | str | None = None,
) -> int:
    """Runs ``command`` inside the nested machine and returns its exit status.

    ``cwd`` (default: the current directory) and ``env`` (default: this process's environment)
    are the command's; ``KVMKIT_NESTED=1`` is added. The folders in ``writable`` are shared
    read-write at the same paths; everything else the command writes is lost when it ends.
    Its output goes to ``output`` (default: this process's stdout) as it comes.
    ``timeout`` bounds the whole run (:class:`NestedTimeout`); the machine gets ``cpus`` emulated
    CPUs and ``memory`` of RAM. Other failures — no QEMU, no kernel package, a module that does
    not load, a machine that does not boot — raise :class:`NestedError`.
    """
    if not command:
        raise NestedError("no command to run in the nested machine")
    if cpus < 1:
        raise NestedError(f"the nested machine needs at least one CPU, not {cpus}")
    memory_mib = parse_size(memory) >> 20
    qemu = shutil.which(QEMU)
    if qemu is None:
        raise NestedError(f"{QEMU} is not installed; install Debian's qemu-system-x86 package")
    image = prepare(cache_dir)
    shares = [_Share(f"share{i}", Path(path).resolve()) for i, path in enumerate(writable)]
    for share in shares:
        if not share.path.is_dir():
            raise NestedError(f"a writable share must be an existing folder: {share.path}")
    with tempfile.TemporaryDirectory(prefix="kvmkit-nested-") as workdir:
        # The exchange folder is shared into the machine; QEMU's control socket stays outside it.
        exchange, control = Path(workdir, "exchange"), Path(workdir, "qmp.sock")
        exchange.mkdir()
        (exchange / "mounts").write_text("".join(f"{s.tag} {s.path}\n" for s in shares))
        (exchange / "run.sh").write_text(_run_script(command, Path(cwd or os.getcwd()), env))
        argv = _qemu_argv(qemu, image, exchange, control, shares, cpus, memory_mib)
        log.debug("starting the nested machine: %s", shlex.join(argv))
        boot_log = _Machine(argv, control, output or sys.stdout.buffer).wait(timeout)
        return check_status(exchange, boot_log)


def _run_script(command: Sequence[str], cwd: Path, env: Mapping[str, str] | None) -> str:
    variables = dict(os.environ if env is None else env)
    variables["KVMKIT_NESTED"] = "1"
    exports = "".join(
        f"export {name}={shlex.quote(value)}\n"
        for name, value in variables.items()
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name)
    )
    return f"{exports}cd {shlex.quote(str(cwd))} || exit {NOT_STARTED}\nexec {shlex.join(command)}\n"


def _qemu_argv(
    qemu: str,
    image: NestedImage,
    exchange: Path,
    control: Path,
    shares: Sequence[_Share],
    cpus: int,
    memory_mib: int,
) -> list[str]:
    def virtfs(tag: str, path: Path, *options: str) -> list[str]:
        spec = ",".join([f"local,path={path}", f"mount_tag={tag}", "security_model=none", *options])
        return ["-virtfs", spec]

    argv = [
        qemu,
        "-machine", "q35,accel=tcg",
        "-cpu", "max",
        "-smp", str(cpus),
        "-m", f"{memory_mib}M",
        "-nodefaults", "-no-user-config", "-no-reboot",
        "-display", "none",
        "-serial", "stdio",
        "-qmp", f"unix:{control},server=on,wait=off",
        "-kernel", str(image.kernel),
        "-initrd", str(image.initrd),
        "-append", "console=ttyS0 quiet loglevel=3 panic=-1 mitigations=off",
    ]  # fmt: skip
    argv += virtfs(ROOT_TAG, Path("/"), "readonly=on", "multidevs=remap")
    argv += virtfs(EXCHANGE_TAG, exchange)
    for share in shares:
        argv += virtfs(share.tag, share.path)
    return argv


class _Machine:
    """A running QEMU: its console is kept until the begin marker, then copied to ``output``."""

    def __init__(self, argv: Sequence[str], control: Path, output: BinaryIO):
        self.control = control
        self.output = output
        self.boot_log = bytearray()
        self.last_output = bytearray()  # the end of what the command printed, for a timeout's message
        self.began = threading.Event()
        self.process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self.reader = threading.Thread(target=self._copy, name="kvmkit-nested-console", daemon=True)
        self.reader.start()

    def _copy(self) -> None:
        console = self.process.stdout
        assert isinstance(console, io.BufferedReader)
        pending = b""
        streaming = False
        for chunk in iter(lambda: console.read1(65536), b""):
            if not streaming:
                self.boot_log += chunk
                at = self.boot_log.find(BEGIN_MARKER + b"\n")
                if at < 0:
                    continue
                streaming = True
                self.began.set()
                chunk = bytes(self.boot_log[at + len(BEGIN_MARKER) + 1 :])
                del self.boot_log[at:]
            pending += chunk
            # Hold back what could be the start of the end marker.
            end = pending.find(END_MARKER)
            if end >= 0:
                self._write(pending[:end])
                pending = b""
                streaming = False  # the rest is the machine powering off
                continue
            keep = _marker_start(pending)
            self._write(pending[: len(pending) - keep])
            pending = pending[len(pending) - keep :]
        if streaming:
            self._write(pending)

    def _write(self, data: bytes) -> None:
        if data:
            self.output.write(data)
            self.output.flush()
            self.last_output += data
            del self.last_output[:-OUTPUT_TAIL_BYTES]

    def wait(self, timeout: float | None) -> bytes:
        """Waits for the machine to power off; returns its console output before the command's."""
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        try:
            while True:
                try:
                    self.process.wait(timeout=0.1)
                    break
                except subprocess.TimeoutExpired:
                    pass
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise NestedTimeout(
                        f"the command in the nested machine did not end within {timeout:g} s; "
                        f"its CPUs then (QEMU's view, twice a second apart):\n{self._cpu_states()}\n"
                        f"the command's last output:\n{_tail(self.last_output)}"
                    )
                if not self.began.is_set() and now >= started + BOOT_TIMEOUT:
                    raise NestedError(
                        f"the nested machine did not start the command within {BOOT_TIMEOUT:g} s; "
                        f"its console:\n{_tail(self.boot_log)}"
                    )
        finally:
            self._kill()
        self.reader.join(timeout=5)
        return bytes(self.boot_log)

    def _cpu_states(self) -> str:
        """Every CPU's registers, sampled twice: a machine stuck in one place shows the same RIP."""
        try:
            samples = []
            for _ in range(2):
                samples.append(_human_monitor(self.control, "info registers -a"))
                time.sleep(1)
            return "\n".join(samples)
        except (OSError, ValueError) as error:
            return f"(QEMU's monitor did not answer: {error})"

    def _kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _marker_start(data: bytes) -> int:
    """The length of the longest end of ``data`` that could begin the end marker."""
    for keep in range(min(len(data), len(END_MARKER) - 1), 0, -1):
        if END_MARKER.startswith(data[-keep:]):
            return keep
    return 0


def _human_monitor(control: Path, command: str) -> str:
    """The answer of QEMU's human monitor to ``command``, asked through its QMP socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as qmp:
        qmp.settimeout(5)
        qmp.connect(str(control))
        replies = qmp.makefile("rwb")

        def ask(request: dict[str, object]) -> object:
            replies.write(json.dumps(request).encode() + b"\n")
            replies.flush()
            while True:
                reply = json.loads(replies.readline() or b"null")
                if reply is None:
                    raise ValueError("QMP closed the connection")
                if "return" in reply or "error" in reply:  # skip asynchronous events
                    return reply.get("return", reply.get("error"))

        json.loads(replies.readline())  # the greeting
        ask({"execute": "qmp_capabilities"})
        answer = ask({"execute": "human-monitor-command", "arguments": {"command-line": command}})
        return str(answer)


def check_status(exchange: Path, boot_log: bytes) -> int:
    """The command's exit status from the exchange folder, or the error that kept it from ending."""
    error = exchange / "error"
    if error.exists():
        raise NestedError(f"the nested machine could not run the command: {error.read_text().strip()}")
    status = exchange / "status"
    if not status.exists():
        raise NestedError(
            f"the nested machine stopped before the command ended; its console:\n{_tail(boot_log)}"
        )
    return int(status.read_text().strip() or NOT_STARTED)


def _tail(log_bytes: bytes | bytearray, lines: int = 30) -> str:
    return "\n".join(log_bytes.decode(errors="replace").splitlines()[-lines:])
