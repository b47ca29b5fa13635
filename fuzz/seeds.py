"""Writes the seed corpora in fuzz/corpus/: inputs that already make a well-behaved driver's
moves, so that fuzzing starts deep in the device paths instead of at the first register.

Usage: python3 fuzz/seeds.py (rewrites fuzz/corpus/<target>/seed-*)."""

from __future__ import annotations

import struct
from pathlib import Path

CORPUS = Path(__file__).resolve().parent / "corpus"

# Split virtqueue layout shared by the seeds: descriptor table, available ring, used ring and
# buffers in the first KiBs of guest memory.
DESC_TABLE, AVAIL_RING, USED_RING, BUFFERS = 0x0, 0x100, 0x200, 0x300
F_NEXT, F_WRITE = 1, 2


def descriptor(addr: int, length: int, flags: int, next_index: int = 0) -> bytes:
    return struct.pack("<QIHH", addr, length, flags, next_index)


def queue_memory(chains: list[list[tuple[int, int, int]]], buffers: dict[int, bytes]) -> bytes:
    """Guest memory holding ``chains`` (lists of (addr, len, flags)) made available in order,
    with ``buffers`` (address -> contents) written in."""
    memory = bytearray(BUFFERS + 0x1000)
    heads, index = [], 0
    for chain in chains:
        heads.append(index)
        for position, (addr, length, flags) in enumerate(chain):
            last = position == len(chain) - 1
            entry = descriptor(addr, length, flags | (0 if last else F_NEXT), index + 1)
            memory[DESC_TABLE + 16 * index : DESC_TABLE + 16 * (index + 1)] = entry
            index += 1
    ring = struct.pack("<HH", 0, len(heads)) + b"".join(struct.pack("<H", h) for h in heads)
    memory[AVAIL_RING : AVAIL_RING + len(ring)] = ring
    for addr, contents in buffers.items():
        memory[addr : addr + len(contents)] = contents
    # The rest of guest memory is zero anyway; short inputs stay under libFuzzer's length cap.
    return bytes(memory).rstrip(b"\0")


# --------------------------------------------------------------------------- virtio_mmio

READ, WRITE, NOTIFY_AND_PROCESS = 0, 1, 3
ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK = 1, 2, 8, 4


def mmio_op(kind: int, offset: int = 0, value: int = 0) -> bytes:
    return struct.pack("<BHI", kind, offset, value)


def mmio_handshake(queue_size: int = 16) -> list[bytes]:
    """A driver's start: status bits, VERSION_1, queue 0 at the shared layout, DRIVER_OK."""
    return [
        mmio_op(READ, 0x00),  # magic
        mmio_op(WRITE, 0x70, ACKNOWLEDGE),
        mmio_op(WRITE, 0x70, ACKNOWLEDGE | DRIVER),
        mmio_op(WRITE, 0x14, 1),
        mmio_op(READ, 0x10),
        mmio_op(WRITE, 0x24, 1),
        mmio_op(WRITE, 0x20, 1),  # VERSION_1 (bit 32)
        mmio_op(WRITE, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK),
        mmio_op(WRITE, 0x30, 0),
        mmio_op(READ, 0x34),
        mmio_op(WRITE, 0x38, queue_size),
        mmio_op(WRITE, 0x80, DESC_TABLE),
        mmio_op(WRITE, 0x90, AVAIL_RING),
        mmio_op(WRITE, 0xA0, USED_RING),
        mmio_op(WRITE, 0x44, 1),
        mmio_op(WRITE, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK),
    ]


def mmio_input(ops: list[bytes], memory: bytes) -> bytes:
    return struct.pack("<H", len(ops)) + b"".join(ops) + memory


def virtio_mmio_seeds() -> dict[str, bytes]:
    entropy = queue_memory([[(BUFFERS, 64, F_WRITE)], [(BUFFERS + 0x100, 16, F_WRITE)]], {})
    served = [
        *mmio_handshake(),
        mmio_op(WRITE, 0x50, 0),
        mmio_op(NOTIFY_AND_PROCESS),
        mmio_op(READ, 0x60),
        mmio_op(WRITE, 0x64, 1),
    ]
    reset = [*served, mmio_op(WRITE, 0x70, 0), *mmio_handshake(8)]
    return {
        "seed-handshake": mmio_input(mmio_handshake(), b""),
        "seed-entropy-request": mmio_input(served, entropy),
        "seed-reset-and-again": mmio_input(reset, entropy),
    }


# --------------------------------------------------------------------------- virtio_block

T_IN, T_OUT, T_FLUSH, T_GET_ID = 0, 1, 4, 8


Chain = list[tuple[int, int, int]]


def block_request(data_len: int, at: int, data_flags: int) -> Chain:
    """A request's descriptors: its header at ``at``, then data, then the status byte."""
    chain = [(at, 16, 0)]
    if data_len:
        chain.append((at + 16, data_len, data_flags))
    chain.append((at + 16 + data_len, 1, F_WRITE))
    return chain


def virtio_block_seeds() -> dict[str, bytes]:
    header = BUFFERS

    def one(kind: int, sector: int, data_len: int, data_flags: int) -> bytes:
        chain = block_request(data_len, header, data_flags)
        return queue_memory([chain], {header: struct.pack("<IIQ", kind, 0, sector)})

    return {
        "seed-read": one(T_IN, 1, 512, F_WRITE),
        "seed-write": one(T_OUT, 2, 512, 0),
        "seed-flush": one(T_FLUSH, 0, 0, 0),
        "seed-get-id": one(T_GET_ID, 0, 20, F_WRITE),
    }


def main() -> None:
    for target, seeds in (("virtio_mmio", virtio_mmio_seeds()), ("virtio_block", virtio_block_seeds())):
        folder = CORPUS / target
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in seeds.items():
            (folder / name).write_bytes(data)
        print(f"{target}: {len(seeds)} seeds in {folder}")


if __name__ == "__main__":
    main()
