"""Linux guest images: the kernel inside a bzImage, and kvmkit's default guest.

The default guest is built from parts any Debian machine can get with apt: the kernel that the
``linux-image-cloud-amd64`` metapackage points to (small, and made for VMs) and ``busybox-static``.
Its initramfs holds busybox, the kernel's virtio modules, kvmkit's guest agent (``guests/agent.c``,
compiled with the host's C compiler; see :mod:`kvmkit.agent`) and an ``/init`` that starts the
agent, signals kvmkit's boot timer, prints :data:`READY_MARKER` and runs a shell on the console.
The result is cached per kernel package version and recipe (the agent's source and ``/init``), so
only the first call downloads and builds anything; later calls do not run apt.
"""

from __future__ import annotations

import bz2
import hashlib
import json
import logging
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Protocol

from kvmkit._core import Initramfs
from kvmkit.agent import AGENT_PORT
from kvmkit.errors import ImageError
from kvmkit.vm import DEFAULT_CMDLINE

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CMDLINE",
    "READY_MARKER",
    "GuestImage",
    "build_agent",
    "default_guest",
    "extract_vmlinux",
]

#: The line the default guest prints on its console once it is up.
READY_MARKER = "kvmkit-guest-ready"
#: kvmkit's boot timer: the guest writes BOOT_TIMER_VALUE (one byte) here when it is up.
BOOT_TIMER_ADDR = 0xD000_0000
BOOT_TIMER_VALUE = 123

KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
#: The virtio drivers of the default guest. The cloud kernel builds all of them as modules, and
#: the transports (PCI, and MMIO for devices described by ACPI) are not dependencies of the
#: device drivers, so they are listed too.
GUEST_MODULES = (
    "virtio_pci",
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "virtio_rng",
    "vmw_vsock_virtio_transport",
)
#: The busybox applets /init runs before ``busybox --install`` has made the others.
INIT_APPLETS = ("sh", "mount", "insmod", "devmem", "setsid", "cttyhack", "reboot")
#: Empty directories of the guest's root: mount points, and the targets of ``busybox --install``.
ROOT_DIRS = ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "etc", "root")
TOOLS = ("apt-get", "apt-cache", "dpkg-deb")
#: The guest agent: its source in the package, where the initramfs has it, how it is compiled.
AGENT_SOURCE = "guests/agent.c"
AGENT_PATH = "sbin/kvmkit-agent"
AGENT_CC = "cc"
AGENT_CFLAGS = ("-static", "-O2", "-Wall")
#: The driver whose presence makes /init start the agent.
VSOCK_DRIVER = "/sys/bus/virtio/drivers/vmw_vsock_virtio_transport"
#: What a cached default guest holds; part of its cache key, with /init and the agent.
IMAGE_LAYOUT = "bzImage vmlinux initrd.cpio\n"
INSTEAD = "pass --kernel and --initrd to boot a kernel and initramfs of your own instead"

ELF_MAGIC = b"\x7fELF"


@dataclass(frozen=True)
class GuestImage:
    """A bootable guest: the kernel as bzImage and as ELF, an initramfs, and a command line."""

    kernel: Path
    vmlinux: Path
    initrd: Path
    kernel_version: str
    cmdline: str


# --------------------------------------------------------------------------- bzImage


# Offsets in the real-mode setup header (Documentation/arch/x86/boot.rst).
SETUP_SECTS = 0x1F1
BOOT_FLAG = 0x1FE
HEADER_MAGIC = 0x202
PROTOCOL_VERSION = 0x206
PAYLOAD_OFFSET = 0x248
PAYLOAD_LENGTH = 0x24C
PAYLOAD_PROTOCOL = 0x0208  # the first protocol version with payload_offset/payload_length
SECTOR = 512
#: At most this many hits of each magic number are tried when the header gives no payload.
MAX_SCAN_HITS = 16


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The uncompressed ELF kernel inside ``bzimage``, whichever compression the kernel used.

    A PVH or ELF loader needs this ``vmlinux`` rather than the bzImage's self-decompressing stub.
    Raises :class:`ImageError` when no compressed ELF kernel is found.
    """
    payload = _header_payload(bzimage)
    if payload is not None:
        kernel = _decompress_any(payload)
        if kernel is not None:
            return kernel
        log.debug("the payload the setup header names is not a known compressed ELF; scanning")
    for offset in _scan_offsets(bzimage):
        kernel = _decompress_any(bzimage[offset:])
        if kernel is not None:
            log.debug("found the compressed kernel at %#x by its magic number", offset)
            return kernel
    raise ImageError(
        "no compressed ELF kernel found in the image: it is not a bzImage, or it uses a compression "
        "kvmkit cannot read (gzip, xz, lzma, bzip2, lz4 and zstd are supported)"
    )


def _header_payload(bzimage: bytes) -> bytes | None:
    """The compressed payload that a boot protocol 2.08+ setup header points to, if any."""
    if len(bzimage) < PAYLOAD_LENGTH + 4 or bzimage[HEADER_MAGIC : HEADER_MAGIC + 4] != b"HdrS":
        return None
    (boot_flag,) = struct.unpack_from("<H", bzimage, BOOT_FLAG)
    (version,) = struct.unpack_from("<H", bzimage, PROTOCOL_VERSION)
    if boot_flag != 0xAA55 or version < PAYLOAD_PROTOCOL:
        return None
    setup_sects = bzimage[SETUP_SECTS] or 4  # 0 means 4, for old kernels
    offset, length = struct.unpack_from("<II", bzimage, PAYLOAD_OFFSET)
    start = (setup_sects + 1) * SECTOR + offset  # payload_offset counts from the protected-mode code
    if length == 0 or start + length > len(bzimage):
        return None
    return bzimage[start : start + length]


def _scan_offsets(image: bytes) -> list[int]:
    """Where a known compressed stream may start, in file order (for pre-2.08 or odd images).

    Short magic numbers also occur in code, so only the first hits of each are tried.
    """
    hits: list[int] = []
    for magic in _DECOMPRESSORS:
        matches = re.finditer(re.escape(magic), image)
        hits.extend(match.start() for _, match in zip(range(MAX_SCAN_HITS), matches))
    return sorted(hits)


def _decompress_any(data: bytes) -> bytes | None:
    """``data`` decompressed by the format its magic names, if that gives an ELF file."""
    for magic, decompress in _DECOMPRESSORS.items():
        if data.startswith(magic):
            try:
                output = decompress(data)
            except _DecompressError as error:
                log.debug("not a %s stream: %s", decompress.__name__.strip("_"), error)
                return None
            return output if output.startswith(ELF_MAGIC) else None
    return None


class _DecompressError(Exception):
    """A stream is corrupt or truncated (only ever seen by the scan, which then moves on)."""


def _gunzip(data: bytes) -> bytes:
    return _finish_stream(zlib.decompressobj(16 + zlib.MAX_WBITS), data, zlib.error)


def _xz(data: bytes) -> bytes:
    return _finish_stream(lzma.LZMADecompressor(lzma.FORMAT_XZ), data, lzma.LZMAError)


def _lzma(data: bytes) -> bytes:
    return _finish_stream(lzma.LZMADecompressor(lzma.FORMAT_ALONE), data, lzma.LZMAError)


def _bunzip2(data: bytes) -> bytes:
    return _finish_stream(bz2.BZ2Decompressor(), data, OSError)


def _zstd(data: bytes) -> bytes:
    import zstandard

    # One frame only: what follows is the kernel's appended size, not another frame.
    stream = zstandard.ZstdDecompressor().decompressobj(read_across_frames=False)
    return _finish_stream(stream, data, zstandard.ZstdError)


class _Stream(Protocol):
    """What the stdlib and zstandard decompressor objects have in common."""

    @property
    def eof(self) -> bool: ...

    def decompress(self, data: bytes, /) -> bytes: ...


def _finish_stream(stream: _Stream, data: bytes, errors: type[Exception]) -> bytes:
    """Decompresses one stream, ignoring what follows it (the kernel appends the output size)."""
    try:
        output = stream.decompress(data)
    except errors as error:
        raise _DecompressError(str(error)) from error
    if not stream.eof:
        raise _DecompressError("the stream is truncated")
    return output


LZ4_LEGACY_MAGIC = struct.pack("<I", 0x184C2102)
LZ4_LEGACY_BLOCK = 8 << 20  # every block of the legacy format holds at most 8 MiB


def _lz4_legacy(data: bytes) -> bytes:
    """The kernel's lz4 format (``lz4 -l``): the magic, then blocks each led by its LE32 length.

    The stream has no end marker; it ends where the next length does not fit the data left, as
    the kernel's appended output size does.
    """
    import lz4.block  # type: ignore[import-untyped]

    blocks = []
    position = len(LZ4_LEGACY_MAGIC)
    while position + 4 <= len(data):
        (length,) = struct.unpack_from("<I", data, position)
        if length == 0x184C2102:  # concatenated streams repeat the magic
            position += 4
            continue
        if length == 0 or position + 4 + length > len(data):
            break
        block = data[position + 4 : position + 4 + length]
        try:
            blocks.append(lz4.block.decompress(block, uncompressed_size=LZ4_LEGACY_BLOCK))
        except lz4.block.LZ4BlockError as error:
            raise _DecompressError(f"lz4 block at {position:#x}: {error}") from error
        position += 4 + length
    if not blocks:
        raise _DecompressError("no lz4 block follows the magic")
    return b"".join(blocks)


_DECOMPRESSORS: dict[bytes, Callable[[bytes], bytes]] = {
    b"\x1f\x8b\x08": _gunzip,
    b"\xfd7zXZ\x00": _xz,
    b"\x5d\x00\x00\x00": _lzma,  # lc=3 lp=0 pb=2, dictionary a multiple of 16 MiB (lzma -9)
    b"BZh": _bunzip2,
    LZ4_LEGACY_MAGIC: _lz4_legacy,
    b"\x28\xb5\x2f\xfd": _zstd,
}


# --------------------------------------------------------------------------- kernel modules


MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


def _module_name(filename: str) -> str | None:
    """The module name of a module file (``virtio-rng.ko.xz`` -> ``virtio_rng``), else None."""
    for suffix in MODULE_SUFFIXES:
        if filename.endswith(suffix):
            return filename[: -len(suffix)].replace("-", "_")
    return None


def _read_module(path: Path) -> bytes:
    """A module file's ELF bytes; kernels may ship them compressed, but insmod wants them plain."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return zlib.decompress(data, 16 + zlib.MAX_WBITS)
    if path.name.endswith(".ko.zst"):
        return _zstd(data)
    return data


def _modinfo_depends(module: bytes) -> list[str]:
    """The ``depends=`` entry of a module's ``.modinfo`` section: what must be loaded first.

    Debian's kernel packages leave modules.dep to depmod at install time, so the dependencies are
    read where depmod reads them.
    """
    for entry in _elf_section(module, ".modinfo").split(b"\0"):
        if entry.startswith(b"depends="):
            return [name.replace("-", "_") for name in entry[8:].decode().split(",") if name]
    return []


def _elf_section(elf: bytes, wanted: str) -> bytes:
    """The contents of the section ``wanted`` of a 64-bit little-endian ELF file (empty if none)."""
    if not elf.startswith(ELF_MAGIC) or elf[4] != 2 or elf[5] != 1:
        raise ImageError("a kernel module is not a 64-bit little-endian ELF file")
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    names_offset = sections[shstrndx][4]
    for name, _type, _flags, _addr, offset, size in sections:
        end = elf.index(b"\0", names_offset + name)
        if elf[names_offset + name : end].decode() == wanted:
            return elf[offset : offset + size]
    return b""


@dataclass(frozen=True)
class KernelTree:
    """The modules of an unpacked kernel package: their files, and which are built in."""

    module_dir: Path
    files: dict[str, Path]
    builtin: frozenset[str]

    @classmethod
    def load(cls, module_dir: Path) -> KernelTree:
        files = {}
        for path in sorted((module_dir / "kernel").rglob("*.ko*")):
            name = _module_name(path.name)
            if name is not None:
                files[name] = path
        builtin_list = module_dir / "modules.builtin"
        lines = builtin_list.read_text().split() if builtin_list.exists() else []
        builtin = frozenset(name for line in lines if (name := _module_name(Path(line).name)))
        return cls(module_dir, files, builtin)

    def load_order(
        self, wanted: Iterable[str], needed_by: str = "the default guest"
    ) -> list[tuple[str, bytes]]:
        """``(path in the initramfs, ELF bytes)`` of ``wanted`` and their dependencies, each after
        what it depends on; built-in modules are left out."""
        ordered: list[tuple[str, bytes]] = []
        seen: set[str] = set()

        def visit(name: str, needed_by: str) -> None:
            if name in seen or name in self.builtin:
                return
            seen.add(name)
            path = self.files.get(name)
            if path is None:
                raise ImageError(f"the kernel package has no module {name} (needed by {needed_by})")
            module = _read_module(path)
            for dependency in _modinfo_depends(module):
                visit(dependency, name)
            relative = path.relative_to(self.module_dir).with_name(f"{_module_stem(path.name)}.ko")
            ordered.append((f"lib/modules/{self.module_dir.name}/{relative}", module))

        for name in wanted:
            visit(name, needed_by)
        return ordered


def _module_stem(filename: str) -> str:
    """The file name of a module without ``.ko`` and any compression suffix."""
    return filename.split(".ko", 1)[0]


# --------------------------------------------------------------------------- initramfs


def init_script(modules: Sequence[str], agent: str | None = AGENT_PATH) -> str:
    """The guest's ``/init``: mounts, loads ``modules`` in order, starts the guest agent at
    ``agent`` (if not None) when the vsock driver is there, reports ready, runs a shell."""
    loads = "".join(f"load /{path}\n" for path in modules)
    start_agent = (
        f"# kvmkit's guest agent (VM.exec, put_file, get_file) listens on vsock port {AGENT_PORT}.\n"
        f"[ -d {VSOCK_DRIVER} ] && /{agent} < /dev/null &\n"
        if agent is not None
        else ""
    )
    return f"""#!/bin/sh
# /init of the kvmkit default guest.
export PATH=/sbin:/usr/sbin:/bin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s
load() {{ insmod "$1" || echo "kvmkit: cannot load $1" >&2; }}
{loads}{start_agent}# Stop kvmkit's boot timer: one byte to the guest physical address it watches.
devmem {BOOT_TIMER_ADDR:#x} 8 {BOOT_TIMER_VALUE}
echo {READY_MARKER}
setsid cttyhack sh
reboot -f
"""


def build_initramfs(
    busybox: bytes, modules: Sequence[tuple[str, bytes]], agent: bytes | None = None
) -> bytes:
    """An uncompressed initramfs with busybox, ``modules`` (loaded in order), the guest agent's
    executable ``agent`` (started by /init) if given, and ``/init``."""
    archive = Initramfs()
    for directory in ROOT_DIRS:
        archive.add_dir(directory, 0o700 if directory == "root" else 0o755)
    archive.add_dir("tmp", 0o1777)
    archive.add_char_device("dev/console", 5, 1, 0o600)
    archive.add_file("bin/busybox", busybox, 0o755)
    for applet in INIT_APPLETS:
        archive.add_symlink(f"bin/{applet}", "busybox")
    for path, data in modules:
        archive.add_file(path, data, 0o644)
    if agent is not None:
        archive.add_file(AGENT_PATH, agent, 0o755)
    script = init_script([path for path, _ in modules], AGENT_PATH if agent is not None else None)
    archive.add_file("init", script.encode(), 0o755)
    return archive.finish()


def agent_source() -> bytes:
    """The C source of the guest agent, as shipped in the package."""
    return resources.files("kvmkit").joinpath(AGENT_SOURCE).read_bytes()


def build_agent(output: Path | str, cc: str = AGENT_CC) -> None:
    """Compiles the guest agent into the static executable ``output`` with the host's compiler.

    Raises :class:`ImageError` when there is no compiler, or it cannot link statically (Debian's
    ``gcc`` with ``libc6-dev`` can).
    """
    how = "install a C compiler and static C library (Debian: apt-get install gcc libc6-dev)"
    compiler = shutil.which(cc)
    if compiler is None:
        raise ImageError(f"building the guest agent needs a C compiler, but there is no `{cc}`; {how}")
    output = Path(output)
    with tempfile.TemporaryDirectory(prefix="kvmkit-agent-") as work:
        source = Path(work) / "agent.c"
        source.write_bytes(agent_source())
        command = [compiler, *AGENT_CFLAGS, "-o", str(output), str(source)]
        log.info("compiling the guest agent")
        log.debug("running %s", " ".join(command))
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ImageError(
            f"compiling the guest agent failed (`{' '.join(command)}`, exit {done.returncode}); "
            f"{how}:\n{done.stderr.strip()}"
        )


def guest_recipe() -> str:
    """A short hash of what goes into the default guest besides the kernel: /init, the agent's
    source and how it is compiled, the layout. A change to any of them makes a new cache entry."""
    recipe = hashlib.sha256()
    for part in (
        IMAGE_LAYOUT,
        init_script(GUEST_MODULES),
        repr((ROOT_DIRS, INIT_APPLETS, AGENT_PATH, AGENT_CFLAGS)),
    ):
        recipe.update(part.encode() + b"\0")
    recipe.update(agent_source())
    return recipe.hexdigest()[:12]


# --------------------------------------------------------------------------- Debian packages


@dataclass(frozen=True)
class Package:
    name: str
    version: str

    @property
    def release(self) -> str:
        """A kernel package's release (``linux-image-6.1.0-9-amd64`` -> ``6.1.0-9-amd64``)."""
        return self.name.removeprefix("linux-image-")

    @property
    def cache_key(self) -> str:
        """A directory name for things built from this version of the package."""
        return re.sub(r"[^A-Za-z0-9.+~-]", "_", f"{self.release}_{self.version}")


def _run(command: Sequence[str], cwd: Path | None = None) -> str:
    """The stdout of ``command``; a failure becomes an ImageError that quotes its stderr. It runs
    in the C locale: apt's answers are parsed, and a user's ``LANGUAGE`` would translate them."""
    log.debug("running %s", " ".join(command))
    env = {**os.environ, "LC_ALL": "C", "LANGUAGE": ""}
    try:
        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    except FileNotFoundError as error:
        raise ImageError(f"{command[0]} is not installed; {INSTEAD}") from error
    if done.returncode != 0:
        raise ImageError(f"`{' '.join(command)}` failed (exit {done.returncode}): {done.stderr.strip()}")
    return done.stdout


def require_tools() -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        raise ImageError(
            f"building the default guest needs {', '.join(TOOLS)} (a Debian system), but "
            f"{', '.join(missing)} is missing; {INSTEAD}"
        )


def _kernel_package_name(metapackage: str) -> str | None:
    """The versioned kernel package ``metapackage`` depends on, if apt knows it."""
    try:
        depends = _run(["apt-cache", "depends", metapackage])
    except ImageError:
        return None
    match = re.search(r"^\s*\|?Depends:\s*(linux-image-[^\s<>]+)", depends, re.MULTILINE)
    return match.group(1) if match else None


def candidate(name: str) -> Package:
    """The version of ``name`` that apt would download."""
    policy = _run(["apt-cache", "policy", name])
    match = re.search(r"^\s*Candidate:\s*(\S+)", policy, re.MULTILINE)
    if match is None or match.group(1) == "(none)":
        raise ImageError(f"apt has no downloadable version of {name}; run `apt-get update` or {INSTEAD}")
    return Package(name, match.group(1))


def resolve_kernel(metapackage: str = KERNEL_METAPACKAGE, cache_dir: Path | str | None = None) -> Package:
    """The kernel package ``metapackage`` points to, updating apt's lists once if they lack it.

    Asking apt takes seconds (far more under an emulator), and its answer changes only when its
    package lists do; so the answer is remembered in the cache with the lists' modification time.
    """
    memo = cache_root(cache_dir) / "apt-resolved.json"
    lists = _apt_lists_stamp()
    remembered = _read_json(memo).get(metapackage)
    if isinstance(remembered, dict) and lists is not None and remembered.get("lists") == lists:
        return Package(str(remembered["name"]), str(remembered["version"]))
    package = _resolve_with_apt(metapackage)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        answers = _read_json(memo)
        answers[metapackage] = {"name": package.name, "version": package.version, "lists": _apt_lists_stamp()}
        staging = memo.with_suffix(f".{os.getpid()}.tmp")
        staging.write_text(json.dumps(answers, indent=1))
        staging.replace(memo)
    except OSError as error:
        log.debug("cannot remember apt's answer in %s: %s", memo, error)
    return package


APT_LISTS = Path("/var/lib/apt/lists")


def _apt_lists_stamp() -> int | None:
    """When apt's package lists last changed (``apt-get update`` renames new lists into place)."""
    try:
        return APT_LISTS.stat().st_mtime_ns
    except OSError:
        return None


def _read_json(path: Path) -> dict[str, object]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _resolve_with_apt(metapackage: str) -> Package:
    name = _kernel_package_name(metapackage)
    if name is None:
        log.info("apt knows no %s; running apt-get update", metapackage)
        try:
            _run(["apt-get", "update"])
        except ImageError as error:
            raise ImageError(f"{error}\n(apt-get update needs root; run it, or {INSTEAD})") from error
        name = _kernel_package_name(metapackage)
    if name is None:
        raise ImageError(
            f"apt knows no {metapackage} (it is in Debian's main archive); add Debian to the apt "
            f"sources or {INSTEAD}"
        )
    return candidate(name)


def fetch_package(package: Package, work: Path) -> Path:
    """Downloads ``package`` with apt-get and unpacks it into a directory of its own."""
    log.info("downloading %s %s", package.name, package.version)
    downloads = work / "debs"
    downloads.mkdir(parents=True, exist_ok=True)
    _run(["apt-get", "download", f"{package.name}={package.version}"], cwd=downloads)
    debs = sorted(downloads.glob(f"{package.name}_*.deb"))
    if not debs:
        raise ImageError(f"apt-get download left no {package.name}_*.deb in {downloads}")
    root = work / package.name
    _run(["dpkg-deb", "-x", str(debs[-1]), str(root)])
    return root


# --------------------------------------------------------------------------- default guest


def cache_root(cache_dir: Path | str | None = None) -> Path:
    """Where kvmkit caches guests: ``cache_dir``, else ``$XDG_CACHE_HOME/kvmkit`` or ``~/.cache/kvmkit``."""
    if cache_dir is not None:
        return Path(cache_dir)
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "kvmkit"


def default_guest(cache_dir: Path | str | None = None) -> GuestImage:
    """The default Linux guest, built on first use from Debian's cloud kernel and busybox.

    The first call needs apt-get, apt-cache and dpkg-deb, and a C compiler that links statically
    for the guest agent (:func:`build_agent`); it downloads about 30 MB. Later calls use the cached
    build without running apt or the compiler at all (no ``apt-get update`` either), so the cached
    guest keeps its kernel: remove the cache's ``guests`` folder to build one with Debian's current
    kernel. A change to the agent or to ``/init`` makes a new guest (and needs apt once more).
    """
    recipe = guest_recipe()
    cached = cached_guest(recipe, cache_dir)
    if cached is not None:
        return cached
    require_tools()
    kernel = resolve_kernel(cache_dir=cache_dir)
    release = kernel.release
    target = cache_root(cache_dir) / "guests" / f"{kernel.cache_key}-{recipe}"
    build_cached(target, "the default guest", lambda staging: _build_into(staging, kernel, release))
    return _guest_image(target, release)


def cached_guest(recipe: str, cache_dir: Path | str | None = None) -> GuestImage | None:
    """The default guest of ``recipe`` if the cache has one, found without asking apt: the build
    for the kernel apt last named, else the newest build."""
    suffix = f"-{recipe}"
    guests = cache_root(cache_dir) / "guests"
    try:
        # Staging folders are hidden; a complete guest is renamed into place.
        found = [
            path
            for path in guests.iterdir()
            if path.name.endswith(suffix) and not path.name.startswith(".") and path.is_dir()
        ]
    except OSError:
        return None
    if not found:
        return None
    remembered = _read_json(cache_root(cache_dir) / "apt-resolved.json").get(KERNEL_METAPACKAGE)
    last = None
    if isinstance(remembered, dict) and isinstance(remembered.get("name"), str):
        last = Package(str(remembered["name"]), str(remembered.get("version"))).cache_key + suffix
    chosen = next((path for path in found if path.name == last), None) or max(found, key=_mtime)
    log.info("using the default guest cached in %s", chosen)
    # The folder is named <release>_<package version>-<recipe> (Package.cache_key).
    release = chosen.name[: -len(suffix)].partition("_")[0]
    return _guest_image(chosen, release)


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def _guest_image(folder: Path, release: str) -> GuestImage:
    return GuestImage(
        kernel=folder / "bzImage",
        vmlinux=folder / "vmlinux",
        initrd=folder / "initrd.cpio",
        kernel_version=release,
        cmdline=DEFAULT_CMDLINE,
    )


def build_cached(target: Path, what: str, build: Callable[[Path], None]) -> None:
    """Unless ``target`` exists, runs ``build`` on a staging directory next to it and renames that
    into place, so that ``target`` exists only complete, even with concurrent builders."""
    if target.is_dir():
        log.info("using %s cached in %s", what, target)
        return
    started = time.monotonic()
    log.info("building %s in %s", what, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(staging)
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the guest from other users of the cache
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():
                raise
            log.info("another process built %s first; using it", target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("built %s in %.1f s", what, time.monotonic() - started)


def _build_into(staging: Path, kernel: Package, release: str) -> None:
    """Writes bzImage, vmlinux and initrd.cpio into ``staging``."""
    work = staging / "work"
    work.mkdir()
    # First, so that a missing compiler fails before the downloads.
    build_agent(work / "kvmkit-agent")
    kernel_root = fetch_package(kernel, work)
    busybox_root = fetch_package(candidate(BUSYBOX_PACKAGE), work)

    bzimage = (kernel_root / "boot" / f"vmlinuz-{release}").read_bytes()
    (staging / "bzImage").write_bytes(bzimage)
    log.info("extracting vmlinux")
    (staging / "vmlinux").write_bytes(extract_vmlinux(bzimage))

    tree = KernelTree.load(module_dir(kernel_root, release))
    modules = tree.load_order(GUEST_MODULES)
    log.info("initramfs modules: %s", ", ".join(Path(path).stem for path, _ in modules))
    busybox = (busybox_root / "bin" / "busybox").read_bytes()
    agent = (work / "kvmkit-agent").read_bytes()
    (staging / "initrd.cpio").write_bytes(build_initramfs(busybox, modules, agent))
    shutil.rmtree(work)


def module_dir(kernel_root: Path, release: str) -> Path:
    """``lib/modules/<release>`` of an unpacked kernel package (``usr/lib`` on merged-/usr)."""
    for lib in ("lib", "usr/lib"):
        candidate = kernel_root / lib / "modules" / release
        if candidate.is_dir():
            return candidate
    raise ImageError(f"the kernel package has no lib/modules/{release}")
