"""Freestanding C guests (tests/guests/<name>.c on the runtime in tests/guests/c): the runtime
itself, and the virtio-mmio driver library against devices scripted in Python."""

from __future__ import annotations

import struct

import pytest

pytestmark = [pytest.mark.kvm, pytest.mark.standard_kvm]

M32, M64 = 0xFFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFF
VIRTIO_BASE = 0xD000_0000  # in the MMIO gap, where a 2 MiB VM has no RAM
VIRTIO_MAGIC = 0x7472_6976
VERSION_1 = 1 << 32

# virtio.h's VIRTIO_ERR_*
ERR_MAGIC, ERR_VERSION, ERR_NO_DEVICE, ERR_DEVICE_ID, ERR_FEATURES = -1, -2, -3, -4, -5
ERR_TIMEOUT = -8

# virtio status bits
ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK, FAILED = 1, 2, 4, 8, 128


def int32(value):
    value &= M32
    return value - (1 << 32) if value >= 1 << 31 else value


def hash31(data, start=0):
    """hello.c's and virtio_queue.c's hash: h = h * 31 + byte, in 32 bits."""
    for byte in data:
        start = (start * 31 + byte) & M32
    return start


# --------------------------------------------------------------------------- runtime


def hello_result(arg):
    x = arg ^ 0x9E37_79B9_7F4A_7C15
    data = bytearray()
    for _ in range(256):
        x = (x * 6364136223846793005 + 1442695040888963407) & M64
        data.append(x >> 56)
    data[100] ^= 1
    data[:16] = b"\x5a" * 16
    return hash31(data)


@pytest.mark.parametrize("arg", [0, 0xFEDC_BA98_7654_3210])
def test_c_guest_computes_from_its_argument_and_prints(make_vm, run_c_guest, arg):
    vm = make_vm()

    code, text = run_c_guest(vm, "hello", arg=arg)

    expected = hello_result(arg)
    assert code == int32(expected), text
    assert text == f"hello arg={arg:#x}\nhash={expected:#x}\n"


def test_c_guest_image_starts_with_its_entry(compile_c):
    guest = compile_c("hello")
    assert (guest.load_addr, guest.entry) == (0x10_0000, 0x10_0000)
    assert guest.load_addr + len(guest.image) < guest.end  # .bss is not in the image


# --------------------------------------------------------------------------- virtio probe

PROBE_DEVICES = {
    # name: (MagicValue, Version, DeviceID), expected exit code, registers the probe reads
    "rng": ((VIRTIO_MAGIC, 2, 4), 4, 3),
    "wrong-magic": ((0x1234_5678, 2, 4), ERR_MAGIC, 1),
    "legacy": ((VIRTIO_MAGIC, 1, 4), ERR_VERSION, 2),
    "empty-slot": ((VIRTIO_MAGIC, 2, 0), ERR_NO_DEVICE, 3),
}


@pytest.mark.parametrize("device", PROBE_DEVICES)
def test_virtio_probe(make_vm, run_c_guest, device):
    registers, expected, registers_read = PROBE_DEVICES[device]
    reads = []

    def read(addr, size):
        reads.append((addr - VIRTIO_BASE, size))
        return dict(zip((0, 4, 8), registers))[addr - VIRTIO_BASE]

    vm = make_vm()
    vm.hook_mmio(VIRTIO_BASE, 0x200, read=read)

    code, text = run_c_guest(vm, "virtio_probe", arg=VIRTIO_BASE)

    assert code == expected, text
    assert text == f"probe={expected}\n"
    # 32-bit reads in register order, none past the register that rules the device out
    assert reads == [(0, 4), (4, 4), (8, 4)][:registers_read]


# --------------------------------------------------------------------------- virtio queues


class ScriptedVirtioDevice:
    """A virtio-mmio version 2 device in Python for virtio_queue.c: queue 0 answers each chain
    by writing its readable bytes, reversed, into its writable buffers. It checks the rules of
    the transport that a driver must follow and records what the driver did."""

    CONFIG_BEFORE = struct.pack("<QIHB", 0x1111_2222_3333_4444, 0xCAFE_F00D, 0xBEEF, 0x5A) + b"\0kvmkit"
    CONFIG_AFTER = struct.pack("<Q", 0x0123_4567_89AB_CDEF) + CONFIG_BEFORE[8:]

    def __init__(
        self, vm, *, device_id=4, features=VERSION_1 | 1 << 3 | 1 << 0, accept_features=True, answer=True
    ):
        self.vm = vm
        self.device_id = device_id
        self.features = features
        self.accept_features = accept_features
        self.answer = answer
        self.queue_max = {0: 8}
        # per queue: size, QueueReady, address registers, and the device's own ring positions
        self.queues = {i: {"num": 0, "ready": 0, "addr": {}, "avail": 0, "used": 0} for i in self.queue_max}
        self.status = 0
        self.device_features_sel = self.driver_features_sel = self.queue_sel = 0
        self.driver_features = [0, 0]
        self.interrupt_status = 0
        # The config changes (a new generation) right after the driver's first config read.
        self.config, self.generation = self.CONFIG_BEFORE, 0
        self.status_writes: list[int] = []
        self.chains: list[list[tuple[bool, int]]] = []
        self.acks: list[int] = []
        self.config_reads = 0
        vm.hook_mmio(VIRTIO_BASE, 0x200, read=self.read, write=self.write)

    def queue(self):
        return self.queues.get(self.queue_sel)

    def read(self, addr, size):
        offset = addr - VIRTIO_BASE
        if offset >= 0x100:
            return self.read_config(offset - 0x100, size)
        assert size == 4, f"{size}-byte read of register {offset:#x}"
        queue = self.queue()
        return {
            0x00: VIRTIO_MAGIC,
            0x04: 2,
            0x08: self.device_id,
            0x0C: 0x4B56_4D4B,
            0x10: (self.features >> (32 * self.device_features_sel)) & M32,
            0x34: self.queue_max.get(self.queue_sel, 0),
            0x44: queue["ready"] if queue else 0,
            0x60: self.interrupt_status,
            0x70: self.status,
            0xFC: self.generation,
        }[offset]

    def read_config(self, offset, size):
        assert size in (1, 2, 4) and offset % size == 0, f"{size}-byte config read at {offset:#x}"
        value = int.from_bytes(self.config[offset : offset + size], "little")
        self.config_reads += 1
        if self.generation == 0:
            self.config, self.generation = self.CONFIG_AFTER, 1
        return value

    def write(self, addr, data):
        offset, value = addr - VIRTIO_BASE, int.from_bytes(data, "little")
        assert len(data) == 4 and offset < 0x100, f"{len(data)}-byte write at {offset:#x}"
        queue = self.queue()
        if offset == 0x14:
            self.device_features_sel = value
        elif offset == 0x20:
            self.driver_features[self.driver_features_sel] = value
        elif offset == 0x24:
            self.driver_features_sel = value
        elif offset == 0x30:
            self.queue_sel = value
        elif offset == 0x38:
            queue["num"] = value
        elif offset == 0x44:
            assert queue["num"] and len(queue["addr"]) == 6, "queue made ready before it was described"
            queue["ready"] = value
        elif offset == 0x50:
            assert self.status & DRIVER_OK, "notified before DRIVER_OK"
            if self.answer:
                self.serve(self.queues[value])
        elif offset == 0x64:
            self.acks.append(value)
            self.interrupt_status &= ~value
        elif offset == 0x70:
            self.status_writes.append(value)
            if value & FEATURES_OK and not self.accept_features:
                value &= ~FEATURES_OK
            self.status = value
        elif 0x80 <= offset <= 0xA4:
            queue["addr"][offset] = value
        else:
            raise AssertionError(f"write of {value:#x} to register {offset:#x}")

    def ring(self, queue, low):
        return queue["addr"][low] | queue["addr"][low + 4] << 32

    def u16(self, addr):
        return int.from_bytes(self.vm.mem_read(addr, 2), "little")

    def serve(self, queue):
        desc, avail, used = (self.ring(queue, low) for low in (0x80, 0x90, 0xA0))
        num = queue["num"]
        assert (desc % 16, avail % 2, used % 4) == (0, 0, 0), "misaligned rings"
        while queue["avail"] != self.u16(avail + 2):
            head = self.u16(avail + 4 + 2 * (queue["avail"] % num))
            queue["avail"] = (queue["avail"] + 1) & 0xFFFF
            readable, writable, chain, index = b"", [], [], head
            for _ in range(num):
                entry = self.vm.mem_read(desc + 16 * index, 16)
                addr, length, flags, following = struct.unpack("<QIHH", entry)
                chain.append((bool(flags & 2), length))
                if flags & 2:
                    writable.append((addr, length))
                else:
                    assert not writable, "readable descriptor after a writable one"
                    readable += self.vm.mem_read(addr, length)
                if not flags & 1:
                    break
                index = following
            else:
                raise AssertionError("descriptor chain longer than the queue")
            self.chains.append(chain)
            answer = readable[::-1]
            written = 0
            for addr, length in writable:
                part = answer[written : written + length]
                self.vm.mem_write(addr, part)
                written += len(part)
            element = used + 4 + 8 * (queue["used"] % num)
            self.vm.mem_write(element, struct.pack("<II", head, written))
            queue["used"] = (queue["used"] + 1) & 0xFFFF
            self.vm.mem_write(used + 2, struct.pack("<H", queue["used"]))
            self.interrupt_status |= 1


def queue_walk_result(rounds=5):
    digest = 0
    for round_ in range(rounds):
        answer = f"ping{round_}!".encode()[::-1] + b"\xee\xee"  # 6 bytes into 4 + 4
        digest = hash31(answer + b"\xee", digest)  # the 1-byte buffer gets nothing
    return digest & 0x7FFF_FFFF


def test_virtio_driver_library_against_a_scripted_device(make_vm, run_c_guest):
    vm = make_vm()
    device = ScriptedVirtioDevice(vm)

    code, text = run_c_guest(vm, "virtio_queue", arg=VIRTIO_BASE)

    assert code == queue_walk_result(), text
    assert device.status_writes == [
        0,
        ACKNOWLEDGE,
        ACKNOWLEDGE | DRIVER,
        ACKNOWLEDGE | DRIVER | FEATURES_OK,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
    ]
    # VERSION_1 always, bit 0 as wanted and offered; bit 3 offered only, bit 5 wanted only
    assert device.driver_features == [1 << 0, 1]
    assert text.splitlines()[0] == f"features={VERSION_1 | 1:#x}"
    # The 64-bit field's two halves straddle the generation change (0x0123456733334444 at
    # first), so it is read again; then 6 bytes and 3 smaller fields.
    assert text.splitlines()[1] == "config=0x123456789abcdef 0xcafef00d 0xbeef 0x5a kvmkit"
    assert device.config_reads == 2 * 2 + 6 + 3
    assert device.chains == [[(False, 6), (True, 4), (True, 4)], [(True, 1)]] * 5
    assert device.acks == [1] * 5
    assert device.queues[0]["num"] == 4


@pytest.mark.parametrize(
    ("device_kwargs", "expected", "status"),
    [
        ({"device_id": 2}, ERR_DEVICE_ID, []),
        ({"features": 1 << 0}, ERR_FEATURES, [0, 1, 3, 3 | FAILED]),
        ({"accept_features": False}, ERR_FEATURES, [0, 1, 3, 0xB, 3 | FAILED]),
        ({"answer": False}, ERR_TIMEOUT, [0, 1, 3, 0xB, 0xF]),
    ],
    ids=["wrong-device", "legacy-features", "features-refused", "no-answer"],
)
def test_virtio_driver_library_reports_device_failures(make_vm, run_c_guest, device_kwargs, expected, status):
    vm = make_vm()
    device = ScriptedVirtioDevice(vm, **device_kwargs)

    code, text = run_c_guest(vm, "virtio_queue", arg=VIRTIO_BASE)

    assert code == expected, text
    assert device.status_writes == status
