"""What the test suite and the benchmarks share: the toolchain for freestanding C guests (the
runtime in tests/guests/c), network namespaces for tap devices, and a gdb protocol client.
Importable from both (the benchmarks put this directory on ``sys.path``)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

C_RUNTIME_DIR = Path(__file__).resolve().parent / "guests" / "c"
C_RUNTIME = ["start.S", "guest.c", "virtio.c"]
C_FLAGS = [
    "-std=gnu11",
    "-O2",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-ffreestanding",
    # no loop turned into a call to memset/memcpy inside memset/memcpy themselves
    "-fno-tree-loop-distribute-patterns",
    "-fno-stack-protector",
    "-fno-pic",
    "-fno-pie",
    "-fno-asynchronous-unwind-tables",
    "-mno-red-zone",
    "-mcmodel=small",
    "-mgeneral-regs-only",  # no SSE/x87 code: kvmkit's long mode leaves CR4.OSFXSR clear
    "-nostdlib",
    "-static",
    "-no-pie",
    "-Wl,--build-id=none",
    "-Wl,--no-warn-rwx-segments",
]
C_STACK_TOP = 0x80000  # C guests' stack grows down from here, between the page tables and the image
C_EXIT_PORT = 0x600  # GUEST_EXIT_PORT in guest.h: a dword port
C_DEBUG_PORT = 0x604  # GUEST_DEBUG_PORT in guest.h: a byte port


@dataclass(frozen=True)
class CImage:
    """A linked C guest: ``image`` is loaded at ``load_addr``, execution starts at ``entry``, and
    the guest uses memory up to ``end`` (its .bss follows the image)."""

    image: bytes
    load_addr: int
    entry: int
    end: int


def run_build_step(cmd: Sequence[str | Path]) -> None:
    """Runs one compiler or linker command; its stderr becomes the error."""
    proc = subprocess.run([str(part) for part in cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stderr}")


def elf_layout(elf: bytes) -> tuple[int, int, int]:
    """(entry, first address, end in memory) of an ELF64 executable's PT_LOAD segments."""
    entry, phoff = struct.unpack_from("<QQ", elf, 0x18)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    loads = []
    for i in range(phnum):
        p_type, _, _, _, paddr, _, memsz, _ = struct.unpack_from("<IIQQQQQQ", elf, phoff + i * phentsize)
        if p_type == 1:  # PT_LOAD
            loads.append((paddr, memsz))
    return entry, min(addr for addr, _ in loads), max(addr + memsz for addr, memsz in loads)


def build_c_guest(source: Path, outdir: Path, include: Sequence[Path] = ()) -> CImage:
    """Compiles ``source`` with the runtime, links it by guest.ld and flattens it for loading."""
    elf, flat = outdir / f"{source.stem}.elf", outdir / f"{source.stem}.bin"
    includes = [arg for path in (C_RUNTIME_DIR, *include) for arg in ("-I", str(path))]
    runtime = [C_RUNTIME_DIR / part for part in C_RUNTIME]
    script = C_RUNTIME_DIR / "guest.ld"
    run_build_step(["gcc", *C_FLAGS, *includes, "-T", script, "-o", elf, source, *runtime])
    run_build_step(["objcopy", "-O", "binary", elf, flat])
    entry, start, end = elf_layout(elf.read_bytes())
    return CImage(flat.read_bytes(), start, entry, end)


# --------------------------------------------------------------------------- network namespaces

CLONE_NEWNET = 0x4000_0000
_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def network_namespace(prefix: str) -> Iterator[str]:
    """A fresh network namespace, deleted afterwards with whatever interfaces are left in it."""
    name = f"{prefix}-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)


def in_netns(name: str, fn: Callable[[], T]) -> T:
    """fn() on a thread that joined network namespace ``name``. Namespaces belong to threads, so
    the rest of the process stays where it is; a tap opened there keeps working from anywhere."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    def body() -> None:
        try:
            with open(f"/run/netns/{name}", "rb") as ns:
                if _libc.setns(ns.fileno(), CLONE_NEWNET) != 0:
                    errno = ctypes.get_errno()
                    raise OSError(errno, f"setns({name}): {os.strerror(errno)}")
            outcome.append(fn())
        except BaseException as error:
            failure.append(error)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join(timeout=60)
    if thread.is_alive():
        raise TimeoutError(f"the thread in network namespace {name} hangs")
    if failure:
        raise failure[0]
    return outcome[0]


def ip(netns: str, *args: str) -> str:
    """``ip -n netns ARGS``; its output."""
    return subprocess.run(["ip", "-n", netns, *args], check=True, capture_output=True, text=True).stdout


# --------------------------------------------------------------------------- gdb


class GdbRemote:
    """A minimal GDB Remote Serial Protocol client, for tests of the gdb server."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.pending = b""

    def __enter__(self) -> GdbRemote:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, payload: str) -> None:
        data = payload.encode()
        self.sock.sendall(b"$" + data + b"#" + b"%02x" % (sum(data) % 256))

    def reply(self) -> str:
        while True:
            self.pending = self.pending.lstrip(b"+")
            start = self.pending.find(b"$")
            end = self.pending.find(b"#", start + 1) if start >= 0 else -1
            if start >= 0 and end >= 0 and len(self.pending) >= end + 3:
                payload = self.pending[start + 1 : end]
                self.pending = self.pending[end + 3 :]
                self.sock.sendall(b"+")
                return self.expand(payload).decode()
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"the server hung up; left: {self.pending!r}")
            self.pending += chunk

    @staticmethod
    def expand(payload: bytes) -> bytes:
        """Undoes run-length encoding: `x*n` is x repeated n - 29 more times."""
        out = bytearray()
        i = 0
        while i < len(payload):
            if payload[i : i + 1] == b"*" and out:
                out += out[-1:] * (payload[i + 1] - 29)
                i += 2
            else:
                out.append(payload[i])
                i += 1
        return bytes(out)

    def ask(self, payload: str) -> str:
        self.send(payload)
        return self.reply()

    def close(self) -> None:
        self.sock.close()
