"""kvmkit's virtio devices end to end: C guests (tests/guests/virtio_blk.c, virtio_rng.c) drive
them through KVM as a bare-metal driver would, and the tests check what arrived in guest memory,
in the disk image and in the device counters, and how the devices treat broken drivers."""

from __future__ import annotations

import fcntl
import logging
import random
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import kvmkit
import pytest
from kvmkit.errors import DeviceError, ImageLockedError, IoRangeConflictError
from support import C_DEBUG_PORT, C_EXIT_PORT

pytestmark = pytest.mark.kvm

MEMORY = "4M"
RAM_END = 4 << 20
PARAMS = 0x20_0000  # the guests' parameter block, above their image and .bss
BUF = 0x21_0000  # data buffers from here on

FIRST_SLOT = 0xD010_0000
SLOT_SIZE = 0x1000
SECTOR = 512
IMAGE_SIZE = 1 << 20
SECTORS = IMAGE_SIZE // SECTOR

VERSION_1 = 1 << 32
BLK_F_SEG_MAX, BLK_F_RO, BLK_F_BLK_SIZE, BLK_F_FLUSH = 1 << 2, 1 << 5, 1 << 6, 1 << 9
RING_F_EVENT_IDX = 1 << 29  # offered; this driver does not take it
T_IN, T_OUT, T_FLUSH, T_GET_ID = 0, 1, 4, 8
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
ID_LEN = 20

# device status and InterruptStatus bits
ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK, NEEDS_RESET = 1, 2, 4, 8, 64
RUNNING = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
INT_USED, INT_CONFIG = 1, 2

# virtio_blk.c's structs and flags
BLK_MAX_DATA = 4
BLK_PARAMS = struct.Struct("<QIIQQQIIIIII")
BLK_REQUEST = struct.Struct("<IIQ" + "QII" * BLK_MAX_DATA + "II")
FLAG_DRIVER_OK_EARLY, FLAG_NOTIFY_EARLY = 1, 2

# virtio_rng.c's struct and flag
RNG_MAX_REQUESTS = 8
RNG_PARAMS = struct.Struct(f"<QQIIII{RNG_MAX_REQUESTS}I{RNG_MAX_REQUESTS}I{RNG_MAX_REQUESTS}II")
FLAG_INTERRUPTS = 1


def interrupts_settled(device, expected: int, timeout: float = 2.0) -> int:
    """The device's interrupt count once it reaches ``expected`` or ``timeout`` passes.

    A guest that polls the used ring can see its last buffer, finish, and be checked before the
    device thread has raised the interrupt that follows the buffer.
    """
    deadline = time.monotonic() + timeout
    while device.stats.interrupts < expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return device.stats.interrupts


@pytest.fixture
def image(tmp_path):
    """A 1 MiB disk image of random bytes (a fixed seed): (path, contents)."""
    contents = random.Random(0x5EED).randbytes(IMAGE_SIZE)
    path = tmp_path / "disk.img"
    path.write_bytes(contents)
    return path, contents


# --------------------------------------------------------------------------- virtio-blk


@dataclass
class Request:
    """One request for virtio_blk.c: data buffers are (guest address, length, device-writable)."""

    type: int
    sector: int = 0
    data: list[tuple[int, int, bool]] = field(default_factory=list)

    def pack(self) -> bytes:
        buffers = [*self.data, *[(0, 0, False)] * (BLK_MAX_DATA - len(self.data))]
        flat = [value for addr, length, writable in buffers for value in (addr, length, int(writable))]
        return BLK_REQUEST.pack(self.type, len(self.data), self.sector, *flat, 0, 0)


def read(sector, *buffers):
    return Request(T_IN, sector, [(addr, length, True) for addr, length in buffers])


def write(sector, *buffers):
    return Request(T_OUT, sector, [(addr, length, False) for addr, length in buffers])


@dataclass
class BlkRun:
    """What virtio_blk.c found: its params block after the run, and per request (status, used length)."""

    text: str
    offered: int
    features: int
    capacity: int
    seg_max: int
    blk_size: int
    broken_status: int
    broken_isr: int
    reset_status: int
    final_status: int
    answers: list[tuple[int, int]]


def run_blk(vm, run_c_guest, disk, requests, flags=0) -> BlkRun:
    head = BLK_PARAMS.pack(disk.address, flags, len(requests), *[0] * 9)
    vm.mem_write(PARAMS, head + b"".join(request.pack() for request in requests))

    code, text = run_c_guest(vm, "virtio_blk", arg=PARAMS)

    assert code == 0, text
    values = BLK_PARAMS.unpack(vm.mem_read(PARAMS, BLK_PARAMS.size))[3:]
    answers = []
    for i in range(len(requests)):
        raw = vm.mem_read(PARAMS + BLK_PARAMS.size + i * BLK_REQUEST.size, BLK_REQUEST.size)
        used_len, status = BLK_REQUEST.unpack(raw)[-2:]
        answers.append((status, used_len))
    return BlkRun(text, *values, answers)


def stats_tuple(device):
    stats = device.stats
    return stats.requests, stats.bytes_to_guest, stats.bytes_from_guest, stats.errors


def test_disk_negotiates_and_reads_sectors_into_scattered_buffers(make_vm, run_c_guest, image):
    path, contents = image
    vm = make_vm(memory=MEMORY, irqchip=True)  # interrupts are injected and counted
    disk = vm.add_disk(path)
    assert (disk.address, disk.size, disk.kind) == (FIRST_SLOT, SLOT_SIZE, "block")
    # 8 sectors over three buffers in three pages, out of address order
    scattered = [(BUF + 0x3000, 1024), (BUF + 0x1000, 512), (BUF + 0x5200, 2560)]
    for addr, length in [(BUF, 512), *scattered, (BUF + 0x8000, 512)]:
        vm.mem_write(addr, b"\xee" * length)

    run = run_blk(
        vm,
        run_c_guest,
        disk,
        [read(0, (BUF, 512)), read(777, *scattered), read(SECTORS - 1, (BUF + 0x8000, 512))],
    )

    assert run.text.startswith(f"capacity={SECTORS}\n")
    assert run.capacity == SECTORS
    assert run.offered == VERSION_1 | BLK_F_FLUSH | BLK_F_SEG_MAX | BLK_F_BLK_SIZE | RING_F_EVENT_IDX
    assert run.features == run.offered & ~RING_F_EVENT_IDX
    assert run.blk_size == SECTOR
    assert run.seg_max >= len(scattered)
    assert run.answers == [(S_OK, 512 + 1), (S_OK, 4096 + 1), (S_OK, 512 + 1)]
    assert vm.mem_read(BUF, 512) == contents[:512]
    got = b"".join(vm.mem_read(addr, length) for addr, length in scattered)
    assert got == contents[777 * SECTOR : 785 * SECTOR]
    assert vm.mem_read(BUF + 0x8000, 512) == contents[-512:]
    assert vm.mem_read(BUF + 0x5200 + 2560, 16) == bytes(16), "the device wrote past a buffer"
    assert run.final_status == RUNNING
    assert stats_tuple(disk) == (3, 512 + 4096 + 512, 0, 0)
    assert (disk.stats.notifications, interrupts_settled(disk, 3)) == (3, 3)
    assert path.read_bytes() == contents, "reads must not change the image"


def test_disk_writes_change_exactly_the_written_sectors(make_vm, run_c_guest, image):
    path, contents = image
    vm = make_vm(memory=MEMORY)
    disk = vm.add_disk(path)
    first, second, last = (random.Random(seed).randbytes(SECTOR) for seed in (1, 2, 3))
    vm.mem_write(BUF + 0x2000, first)
    vm.mem_write(BUF, second)
    vm.mem_write(BUF + 0x4000, last)

    run = run_blk(
        vm,
        run_c_guest,
        disk,
        [
            write(100, (BUF + 0x2000, SECTOR), (BUF, SECTOR)),
            write(SECTORS - 1, (BUF + 0x4000, SECTOR)),
            Request(T_FLUSH),
            read(100, (BUF + 0x8000, 2 * SECTOR)),  # the guest reads its own write back
        ],
    )

    assert run.answers == [(S_OK, 1), (S_OK, 1), (S_OK, 1), (S_OK, 2 * SECTOR + 1)]
    expected = bytearray(contents)
    expected[100 * SECTOR : 102 * SECTOR] = first + second
    expected[-SECTOR:] = last
    assert path.read_bytes() == expected
    assert vm.mem_read(BUF + 0x8000, 2 * SECTOR) == first + second
    assert stats_tuple(disk) == (4, 2 * SECTOR, 3 * SECTOR, 0)


def test_forks_write_their_own_copies_of_a_writable_disk(make_vm, run_c_guest, image):
    """fork(disks="copy"): each clone writes a copy of the image as it was at the fork; the
    parent and the other clones do not see its writes, and closing it deletes the copy."""
    path, contents = image
    vm = make_vm(memory=MEMORY)
    disk = vm.add_disk(path)
    early, parents, clones_own = (random.Random(seed).randbytes(SECTOR) for seed in (4, 5, 6))
    vm.mem_write(BUF, early)
    assert run_blk(vm, run_c_guest, disk, [write(10, (BUF, SECTOR))]).answers == [(S_OK, 1)]
    with pytest.raises(kvmkit.errors.ConfigError, match='disks="copy"'):
        vm.fork()

    clones = vm.fork(2, disks="copy")
    copies = [clone.virtio_devices[0].path for clone in clones]
    assert len({path, *copies}) == 3 and all(copy.startswith(f"{path}.fork") for copy in copies)
    clones[0].mem_write(BUF, clones_own)
    assert run_blk(
        clones[0], run_c_guest, clones[0].virtio_devices[0], [write(20, (BUF, SECTOR))]
    ).answers == [(S_OK, 1)]
    vm.mem_write(BUF, parents)
    assert run_blk(vm, run_c_guest, disk, [write(30, (BUF, SECTOR))]).answers == [(S_OK, 1)]

    def image_with(*sectors):
        expected = bytearray(contents)
        for number, data in sectors:
            expected[number * SECTOR : (number + 1) * SECTOR] = data
        return bytes(expected)

    assert path.read_bytes() == image_with((10, early), (30, parents))
    with open(copies[0], "rb") as copy:
        assert copy.read() == image_with((10, early), (20, clones_own))
    with open(copies[1], "rb") as copy:
        assert copy.read() == image_with((10, early))
    for clone in clones:
        clone.close()
    assert not any(Path(copy).exists() for copy in copies), "a closed clone deletes its copy"


@pytest.mark.parametrize(
    "serial", ["disk-0042", "ABCDEFGHIJKLMNOPQRST", None], ids=["short", "20-bytes", "default"]
)
def test_disk_get_id_returns_the_serial(make_vm, run_c_guest, image, serial):
    path, _ = image
    vm = make_vm(memory=MEMORY)
    disk = vm.add_disk(path, serial=serial)
    vm.mem_write(BUF, b"\xee" * 32)

    run = run_blk(vm, run_c_guest, disk, [Request(T_GET_ID, 0, [(BUF, ID_LEN, True)])])

    assert run.answers == [(S_OK, ID_LEN + 1)]
    got = vm.mem_read(BUF, ID_LEN)
    if serial is None:
        # derived from the file: the same for another VM on the same image
        assert re.fullmatch(rb"kvmkit-[0-9a-f]{13}", got), got
        other = make_vm(memory=MEMORY)
        again = run_blk(
            other,
            run_c_guest,
            other.add_disk(path, lock=False),
            [Request(T_GET_ID, 0, [(BUF, ID_LEN, True)])],
        )
        assert again.answers == run.answers
        assert other.mem_read(BUF, ID_LEN) == got
    else:
        assert got == serial.encode().ljust(ID_LEN, b"\0")
    assert vm.mem_read(BUF + ID_LEN, 12) == b"\xee" * 12
    assert stats_tuple(disk) == (1, ID_LEN, 0, 0)


def test_disk_request_errors_fail_only_that_request(make_vm, run_c_guest, image):
    path, contents = image
    vm = make_vm(memory=MEMORY)
    disk = vm.add_disk(path)
    vm.mem_write(BUF, b"\xee" * 0x2000)

    run = run_blk(
        vm,
        run_c_guest,
        disk,
        [
            read(SECTORS - 1, (BUF, 2 * SECTOR)),  # starts inside, ends past the end
            read(SECTORS, (BUF, SECTOR)),
            read(1 << 63, (BUF, SECTOR)),  # its byte offset overflows 64 bits
            write(SECTORS, (BUF, SECTOR)),
            read(0, (BUF, 100)),  # not whole sectors
            Request(99, 0, [(BUF, SECTOR, True)]),
            read(5, (BUF + 0x1000, SECTOR)),
        ],
    )

    assert run.answers == [(S_IOERR, 1)] * 5 + [(S_UNSUPP, 1), (S_OK, SECTOR + 1)]
    assert vm.mem_read(BUF, 0x1000) == b"\xee" * 0x1000, "a failed read wrote guest memory"
    assert vm.mem_read(BUF + 0x1000, SECTOR) == contents[5 * SECTOR : 6 * SECTOR]
    assert run.final_status == RUNNING, "a bad request must not break the device"
    assert path.read_bytes() == contents
    assert stats_tuple(disk) == (7, SECTOR, 0, 6)


def test_read_only_disk_refuses_writes(make_vm, run_c_guest, image):
    path, contents = image
    vm = make_vm(memory=MEMORY)
    disk = vm.add_disk(path, read_only=True)
    assert disk.read_only
    vm.mem_write(BUF, b"\x42" * SECTOR)

    run = run_blk(
        vm, run_c_guest, disk, [write(10, (BUF, SECTOR)), Request(T_FLUSH), read(10, (BUF + 0x1000, SECTOR))]
    )

    assert run.offered & BLK_F_RO and run.features & BLK_F_RO
    assert run.answers == [(S_IOERR, 1), (S_OK, 1), (S_OK, SECTOR + 1)]
    assert vm.mem_read(BUF + 0x1000, SECTOR) == contents[10 * SECTOR : 11 * SECTOR]
    assert path.read_bytes() == contents
    assert stats_tuple(disk) == (3, SECTOR, 0, 1)


def test_queue_notifications_cost_no_vmm_exit(make_vm, run_c_guest, image):
    path, _ = image
    exits = {}
    for count in (1, 8):
        vm = make_vm(memory=MEMORY)
        disk = vm.add_disk(path)
        run = run_blk(vm, run_c_guest, disk, [read(1, (BUF, SECTOR))] * count)
        assert run.answers == [(S_OK, SECTOR + 1)] * count
        assert disk.stats.notifications == count
        exits[count] = vm.stats["mmio_exits"]
        vm.close()  # and with it the image's lock

    # The driver touches no register per request but QueueNotify, which the ioeventfd takes.
    assert exits[8] == exits[1]


def test_a_working_device_can_be_reset_and_set_up_again(make_vm, run_c_guest, image):
    path, contents = image
    vm = make_vm(memory=MEMORY)
    disk = vm.add_disk(path)
    first = run_blk(vm, run_c_guest, disk, [read(1, (BUF, SECTOR))] * 3)
    assert first.answers == [(S_OK, SECTOR + 1)] * 3
    vm.unhook_io(C_EXIT_PORT)
    vm.unhook_io(C_DEBUG_PORT)

    # The guest again: it resets the live device and sets up its queue from index 0 again.
    again = run_blk(vm, run_c_guest, disk, [read(2, (BUF, SECTOR))] * 2)

    assert again.answers == [(S_OK, SECTOR + 1)] * 2
    assert vm.mem_read(BUF, SECTOR) == contents[2 * SECTOR : 3 * SECTOR]
    assert stats_tuple(disk) == (5, 5 * SECTOR, 0, 0)


# --------------------------------------------------------------------------- broken drivers


def test_notifying_a_queue_before_it_is_set_up_is_ignored(make_vm, run_c_guest, image):
    path, contents = image
    vm = make_vm(memory=MEMORY)
    disk = vm.add_disk(path)

    run = run_blk(vm, run_c_guest, disk, [read(3, (BUF, SECTOR))], flags=FLAG_NOTIFY_EARLY)

    assert run.answers == [(S_OK, SECTOR + 1)]
    assert vm.mem_read(BUF, SECTOR) == contents[3 * SECTOR : 4 * SECTOR]
    assert run.final_status == RUNNING
    assert stats_tuple(disk) == (1, SECTOR, 0, 0)
    # The early notification may coalesce with the request's in the ioeventfd.
    assert disk.stats.notifications in (1, 2)


def test_driver_ok_without_features_ok_needs_a_reset(make_vm, run_c_guest, image):
    path, contents = image
    vm = make_vm(memory=MEMORY, irqchip=True)
    disk = vm.add_disk(path)

    run = run_blk(vm, run_c_guest, disk, [read(4, (BUF, SECTOR))], flags=FLAG_DRIVER_OK_EARLY)

    assert run.broken_status == ACKNOWLEDGE | DRIVER | NEEDS_RESET
    assert run.broken_isr == INT_CONFIG
    assert run.reset_status == 0
    # after the reset a normal driver works
    assert run.answers == [(S_OK, SECTOR + 1)]
    assert vm.mem_read(BUF, SECTOR) == contents[4 * SECTOR : 5 * SECTOR]
    assert run.final_status == RUNNING
    assert stats_tuple(disk) == (1, SECTOR, 0, 1)
    assert interrupts_settled(disk, 2) == 2  # the config change, then the used buffer


def test_buffers_outside_guest_memory_fail_the_request_only(make_vm, run_c_guest, image, tmp_path):
    path, contents = image
    vm = make_vm(memory=MEMORY)
    disk = vm.add_disk(path)
    other_path = tmp_path / "other.img"
    other_path.write_bytes(contents[: 64 * SECTOR])
    other = make_vm(memory=MEMORY)  # a second VM in the process, alive meanwhile
    other_disk = other.add_disk(other_path)

    run = run_blk(
        vm,
        run_c_guest,
        disk,
        [
            read(1, (64 << 30, SECTOR)),  # far beyond RAM
            read(1, (FIRST_SLOT - 0x10_0000, SECTOR)),  # the MMIO gap
            read(1, (BUF, SECTOR), (RAM_END - 256, SECTOR)),  # straddles the end of RAM
            write(1, (64 << 30, SECTOR)),
            read(2, (BUF + 0x1000, SECTOR)),
        ],
    )

    assert run.answers == [(S_IOERR, 1)] * 4 + [(S_OK, SECTOR + 1)]
    assert vm.mem_read(BUF + 0x1000, SECTOR) == contents[2 * SECTOR : 3 * SECTOR]
    assert run.final_status == RUNNING
    assert path.read_bytes() == contents
    assert stats_tuple(disk) == (5, SECTOR, 0, 4)

    again = run_blk(other, run_c_guest, other_disk, [read(63, (BUF, SECTOR))])
    assert again.answers == [(S_OK, SECTOR + 1)]
    assert other.mem_read(BUF, SECTOR) == contents[63 * SECTOR : 64 * SECTOR]
    assert stats_tuple(other_disk) == (1, SECTOR, 0, 0)


# --------------------------------------------------------------------------- virtio-rng


@dataclass
class RngRun:
    used: list[int]
    isr: list[int]
    isr_acked: list[int]
    interrupts: int


def run_rng(vm, runner, rng, requests, length, flags=0) -> RngRun:
    vm.mem_write(PARAMS, RNG_PARAMS.pack(rng.address, BUF, requests, length, flags, rng.irq, *[0] * 25))

    code, text = runner(vm, "virtio_rng", arg=PARAMS)

    assert code == 0, text
    values = RNG_PARAMS.unpack(vm.mem_read(PARAMS, RNG_PARAMS.size))[6:]
    n = RNG_MAX_REQUESTS
    return RngRun(
        list(values[:requests]),
        list(values[n : n + requests]),
        list(values[2 * n : 2 * n + requests]),
        values[-1],
    )


@pytest.mark.parametrize("irqchip", [False, True], ids=["polled", "irqchip"])
def test_rng_fills_guest_buffers_with_entropy(make_vm, run_c_guest, irqchip):
    vm = make_vm(memory=MEMORY, irqchip=irqchip)
    rng = vm.add_rng()
    assert (rng.address, rng.kind) == (FIRST_SLOT, "rng")
    requests, length = 4, 1024
    vm.mem_write(BUF, bytes(requests * length) + b"\x5a" * 64)

    run = run_rng(vm, run_c_guest, rng, requests, length)

    assert run.used == [length] * requests
    # InterruptStatus shows the used buffer, through the irqfd path too, until acknowledged.
    assert run.isr == [INT_USED] * requests
    assert run.isr_acked == [0] * requests
    data = vm.mem_read(BUF, requests * length)
    chunks = [data[i : i + length] for i in range(0, len(data), length)]
    assert len(set(chunks)) == requests, "two requests got the same bytes"
    # 4096 random bytes miss fewer than 1 of the 256 values on average; a stuck or patterned
    # source (zeros, a counter, a short repeat) gives far fewer or a lopsided histogram.
    counts = [data.count(bytes([value])) for value in range(256)]
    assert sum(1 for count in counts if count) > 240, counts
    assert max(counts) < 64, counts
    assert vm.mem_read(BUF + requests * length, 64) == b"\x5a" * 64, "the device wrote past the buffers"
    stats = rng.stats
    assert (stats.requests, stats.bytes_to_guest, stats.bytes_from_guest, stats.errors) == (4, 4096, 0, 0)
    # Without an irqchip the driver polls InterruptStatus and nothing is injected.
    expected_interrupts = 4 if irqchip else 0
    assert (stats.notifications, interrupts_settled(rng, expected_interrupts)) == (4, expected_interrupts)


def test_rng_interrupt_reaches_the_vcpu(make_vm, run_c_guest, tmp_path):
    vm = make_vm(memory=MEMORY, irqchip=True)
    small = tmp_path / "small.img"
    small.write_bytes(bytes(SECTOR))
    disk = vm.add_disk(small)  # so that the entropy device has the second slot and its own GSI
    rng = vm.add_rng()
    assert rng.address == disk.address + SLOT_SIZE
    assert rng.irq != disk.irq
    assert vm.virtio_devices == [disk, rng]

    run = run_rng(vm, run_c_guest, rng, requests=3, length=64, flags=FLAG_INTERRUPTS)

    assert run.interrupts == 3, "the handler must run once per request"
    assert run.isr == [INT_USED] * 3  # as the handler read it
    assert run.isr_acked == [0] * 3
    assert run.used == [64] * 3
    assert vm.mem_read(BUF, 3 * 64) != bytes(3 * 64)
    assert (rng.stats.requests, interrupts_settled(rng, 3)) == (3, 3)
    assert disk.stats.interrupts == 0


# --------------------------------------------------------------------------- attaching


@pytest.mark.parametrize(
    ("make_image", "message"),
    [
        (lambda path: path.write_bytes(bytes(1000)), r"1000 bytes.*multiple of 512"),
        (lambda path: path.write_bytes(b""), r"empty"),
        (lambda path: path.mkdir(), r"not a regular file"),
        (lambda path: None, r"cannot open disk image .*disk\.img.*No such file"),
    ],
    ids=["1000-bytes", "empty", "directory", "missing"],
)
def test_bad_disk_images_are_refused_at_attach(make_vm, tmp_path, make_image, message):
    vm = make_vm(memory=MEMORY)
    path = tmp_path / "disk.img"
    make_image(path)

    with pytest.raises(DeviceError, match=message):
        vm.add_disk(path)

    assert vm.virtio_devices == []
    good = tmp_path / "good.img"
    good.write_bytes(bytes(SECTOR))
    assert vm.add_disk(good).address == FIRST_SLOT, "a refused disk must not take a slot"


@pytest.mark.parametrize("serial", ["x" * 21, "d\u00efsk", "a\0b"], ids=["21-bytes", "non-ascii", "nul"])
def test_bad_serials_are_refused_at_attach(make_vm, image, serial):
    vm = make_vm(memory=MEMORY)

    with pytest.raises(DeviceError, match="at most 20 bytes of ASCII"):
        vm.add_disk(image[0], serial=serial)

    assert vm.virtio_devices == []


def test_a_failed_attach_leaves_nothing_behind(make_vm):
    vm = make_vm(memory=MEMORY, irqchip=True)
    vm.hook_mmio(FIRST_SLOT, 0x1000, read=lambda addr, size: 0)
    with pytest.raises(IoRangeConflictError):
        vm.add_rng()
    assert vm.virtio_devices == []
    # Had the failed attach left its queue notifier registered with KVM, this one would clash.
    vm.unhook_mmio(FIRST_SLOT)
    rng = vm.add_rng()
    assert (rng.address, vm.virtio_devices) == (FIRST_SLOT, [rng])


# 32-bit: `mov [ebx], eax; dec ecx; jnz back; hlt`, a guest that writes EAX to one MMIO register
# ECX times as fast as it can.
MMIO_WRITE_LOOP = bytes.fromhex("89 03 49 75 fb f4")
QUEUE_NOTIFY = 0x50


def test_guest_misbehaviour_is_logged_under_kvmkit_and_rate_limited(make_vm, caplog):
    caplog.set_level(logging.WARNING, logger="kvmkit")
    vm = make_vm(memory="2M")
    rng = vm.add_rng()
    vm.mem_write(0x1000, MMIO_WRITE_LOOP)
    cpu = vm.vcpus[0]

    def flood(count):
        # Notifying a queue the device does not have marks it broken, with a warning, every time.
        cpu.setup("protected", entry=0x1000)
        for name, value in {"rbx": rng.address + QUEUE_NOTIFY, "rax": 99, "rcx": count}.items():
            cpu.reg_write(name, value)
        started = time.monotonic()
        assert vm.run(timeout=30).reason is kvmkit.ExitReason.HLT
        return time.monotonic() - started

    def broken_records():
        return [r for r in caplog.records if "needing reset" in r.getMessage()]

    def suppressed(record):
        found = re.search(r"\((\d+) more like it suppressed\)", record.getMessage())
        return int(found.group(1)) if found else 0

    seconds = flood(20_000)
    first = broken_records()
    assert 1 <= len(first) <= 5 * (seconds + 2), f"{len(first)} warnings in {seconds:.1f} s"
    assert all(r.name.startswith("kvmkit.core.devices.virtio") for r in first), {r.name for r in first}
    assert all(r.levelno == logging.WARNING for r in first)

    time.sleep(1.1)  # a new window: the next warning reports how many were suppressed
    flood(1)
    records = broken_records()
    assert len(records) == len(first) + 1
    assert suppressed(records[-1]) > 0, records[-1].getMessage()
    assert sum(1 + suppressed(r) for r in records) == 20_001  # every one logged or counted


def test_disk_images_are_locked_against_a_second_writer(make_vm, tmp_path):
    image = tmp_path / "shared.img"
    image.write_bytes(bytes(4096))
    first, second = make_vm(), make_vm()

    first.add_disk(image)
    with pytest.raises(ImageLockedError, match=re.escape(str(image))):
        second.add_disk(image)
    with pytest.raises(ImageLockedError, match="read-write"):
        second.add_disk(image, read_only=True)
    # Other programs see the lock too.
    with image.open("rb") as other, pytest.raises(BlockingIOError):
        fcntl.flock(other.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
    second.add_disk(image, lock=False)  # the explicit way past it

    first.close()  # the lock goes with the VM
    readers = [make_vm(), make_vm()]
    for vm in readers:
        vm.add_disk(image, read_only=True)  # readers share it
    with pytest.raises(ImageLockedError):
        make_vm().add_disk(image)
