"""Port and MMIO accesses served by Python handlers and by the Rust devices, in every CPU mode.

Guest conventions (tests/guests/pio_*.S, mmio_*.S):
  pio_*:  DX = port, EAX = value; OUT 1/2/4 bytes, then IN 1/2/4 bytes into EBX/ECX/ESI.
  mmio_*: EBX = base A, EAX/RAX = value; stores 1@A, 2@A+2, 4@A+4 (8@A+8 in long mode),
          then loads them back into ECX/ESI/EDI (/R8).
"""

import pytest
from kvmkit import ExitReason, devices

pytestmark = [pytest.mark.kvm, pytest.mark.standard_kvm]

HANG_GUARD = 10.0
PORT = 0x3F8
OUT_VALUE = 0x8877_6655_4433_2211  # the guest writes the low 1/2/4/8 bytes of RAX
READ_VALUES = {1: 0xA5, 2: 0xBEEF, 4: 0xDEAD_BEEF, 8: 0x1122_3344_5566_7788}
SENTINEL = 0x5A5A_5A5A  # preloaded into result registers so that a 0 result means something

MODES = ["real", "protected", "long"]
PIO_GUEST = "pio"
PIO_RESULT_REG = {1: "rbx", 2: "rcx", 4: "rsi"}

MMIO_GUEST = {"real": "mmio_real", "protected": "mmio_prot", "long": "mmio_long"}
# Real mode only reaches the first MiB, so there RAM must end below the MMIO window.
MMIO_LAYOUT = {"real": ("512K", 0xD_0000), "protected": ("2M", 0xD000_0000), "long": ("2M", 0xD000_0000)}
MMIO_SIZES = {"real": (1, 2, 4), "protected": (1, 2, 4), "long": (1, 2, 4, 8)}
MMIO_OFFSET = {1: 0, 2: 2, 4: 4, 8: 8}
MMIO_RESULT_REG = {1: "rcx", 2: "rsi", 4: "rdi", 8: "r8"}


def low(value, size):
    return value & ((1 << (8 * size)) - 1)


def le(value, size):
    return low(value, size).to_bytes(size, "little")


def reg(cpu, name, mode):
    """Register value as the guest sees it (upper halves are undefined outside long mode)."""
    value = cpu.reg_read(name)
    return value if mode == "long" else value & 0xFFFF_FFFF


def boot_pio(boot, mode, **vm_kwargs):
    sentinels = {r: SENTINEL for r in PIO_RESULT_REG.values()}
    return boot(PIO_GUEST, mode, regs={"rdx": PORT, "rax": OUT_VALUE, **sentinels}, **vm_kwargs)


def boot_mmio(boot, mode, **vm_kwargs):
    memory, base = MMIO_LAYOUT[mode]
    sentinels = {r: SENTINEL for r in MMIO_RESULT_REG.values()}
    vm = boot(
        MMIO_GUEST[mode], mode, memory=memory, regs={"rbx": base, "rax": OUT_VALUE, **sentinels}, **vm_kwargs
    )
    return vm, base


# --------------------------------------------------------------------------- Python handlers


@pytest.mark.parametrize("as_bytes", [False, True], ids=["int", "bytes"])
@pytest.mark.parametrize("mode", MODES)
def test_pio_python_handlers(boot, io_log, run_halt, mode, as_bytes):
    vm = boot_pio(boot, mode)
    log = io_log(READ_VALUES, as_bytes=as_bytes)
    vm.hook_io(PORT, size=4, read=log.read, write=log.write)

    run_halt(vm)

    assert log.writes == [(PORT, le(OUT_VALUE, size)) for size in (1, 2, 4)]
    assert log.reads == [(PORT, size) for size in (1, 2, 4)]
    cpu = vm.vcpus[0]
    assert {size: reg(cpu, r, mode) for size, r in PIO_RESULT_REG.items()} == {
        size: READ_VALUES[size] for size in (1, 2, 4)
    }


@pytest.mark.parametrize("mode", MODES)
def test_mmio_python_handlers(boot, io_log, run_halt, mode):
    vm, base = boot_mmio(boot, mode)
    log = io_log(READ_VALUES)
    vm.hook_mmio(base, 0x1000, read=log.read, write=log.write)

    run_halt(vm)

    sizes = MMIO_SIZES[mode]
    assert log.writes == [(base + MMIO_OFFSET[size], le(OUT_VALUE, size)) for size in sizes]
    assert log.reads == [(base + MMIO_OFFSET[size], size) for size in sizes]
    cpu = vm.vcpus[0]
    assert {size: reg(cpu, MMIO_RESULT_REG[size], mode) for size in sizes} == {
        size: READ_VALUES[size] for size in sizes
    }


def test_neighbouring_port_ranges_are_dispatched_separately(boot, io_log, run_halt):
    vm = boot_pio(boot, "protected")
    mine, below, above = io_log(READ_VALUES), io_log(READ_VALUES), io_log(READ_VALUES)
    vm.hook_io(PORT - 4, size=4, read=below.read, write=below.write)
    vm.hook_io(PORT, size=4, read=mine.read, write=mine.write)  # adjacent: no conflict
    vm.hook_io(PORT + 4, size=4, read=above.read, write=above.write)

    run_halt(vm)

    assert (len(mine.writes), len(mine.reads)) == (3, 3)
    assert below.reads == below.writes == above.reads == above.writes == []


# --------------------------------------------------------------------------- Rust devices


@pytest.mark.parametrize("mode", MODES)
def test_pio_null_device(boot, run_halt, mode):
    vm = boot_pio(boot, mode)
    null = devices.Null()
    vm.add_io_device(PORT, 4, null)

    run_halt(vm)

    assert (null.reads, null.writes) == (3, 3)
    cpu = vm.vcpus[0]
    assert [reg(cpu, r, mode) for r in PIO_RESULT_REG.values()] == [0, 0, 0]
    assert vm.stats["unhandled_io"] == 0


@pytest.mark.parametrize("mode", MODES)
def test_mmio_scratchpad_device(boot, run_halt, mode):
    vm, base = boot_mmio(boot, mode)
    pad = devices.Scratchpad(16)
    assert pad.data == bytes(16)
    vm.add_mmio_device(base, 16, pad)

    run_halt(vm)

    sizes = MMIO_SIZES[mode]
    expected = bytearray(16)
    for size in sizes:
        expected[MMIO_OFFSET[size] : MMIO_OFFSET[size] + size] = le(OUT_VALUE, size)
    assert pad.data == bytes(expected)
    cpu = vm.vcpus[0]
    assert {size: reg(cpu, MMIO_RESULT_REG[size], mode) for size in sizes} == {
        size: low(OUT_VALUE, size) for size in sizes
    }
    assert vm.stats["unhandled_mmio"] == 0


# --------------------------------------------------------------------------- unhandled accesses


def test_unhandled_pio_ignore_reads_all_ones(boot, run_halt):
    vm = boot_pio(boot, "protected", unhandled_io="ignore")

    run_halt(vm)

    cpu = vm.vcpus[0]
    assert [reg(cpu, PIO_RESULT_REG[size], "protected") for size in (1, 2, 4)] == [0xFF, 0xFFFF, 0xFFFF_FFFF]
    assert vm.stats["unhandled_io"] == 6  # 3 dropped writes + 3 all-ones reads
    assert vm.stats["unhandled_mmio"] == 0


def test_unhandled_mmio_ignore_reads_all_ones(boot, run_halt):
    vm, _ = boot_mmio(boot, "long", unhandled_io="ignore")

    run_halt(vm)

    cpu = vm.vcpus[0]
    assert [reg(cpu, MMIO_RESULT_REG[size], "long") for size in (1, 2, 4, 8)] == [
        0xFF,
        0xFFFF,
        0xFFFF_FFFF,
        0xFFFF_FFFF_FFFF_FFFF,
    ]
    assert vm.stats["unhandled_mmio"] == 8  # 4 dropped writes + 4 all-ones reads
    assert vm.stats["unhandled_io"] == 0


MMIO_STOP_BASE = MMIO_LAYOUT["protected"][1]
STOP_CASES = {
    # guest, registers, expected details (address, size, write) of the first access
    "pio-write": ("pio", {"rdx": PORT}, (PORT, 1, True)),
    "pio-read": ("pio_read_loop", {"rdx": PORT}, (PORT, 4, False)),
    "mmio-write": ("mmio_prot", {"rbx": MMIO_STOP_BASE}, (MMIO_STOP_BASE, 1, True)),
}


@pytest.mark.parametrize("case", STOP_CASES)
def test_unhandled_stop_ends_the_run(boot, case):
    guest, regs, expected = STOP_CASES[case]
    vm = boot(guest, "protected", unhandled_io="stop", regs=regs)

    exit = vm.run(timeout=HANG_GUARD)

    assert exit.reason == ExitReason.UNHANDLED_IO
    details = exit.details
    assert (details["address"], details["size"], bool(details["write"])) == expected
    assert exit.vcpu == 0
    assert vm.last_exit.reason == ExitReason.UNHANDLED_IO
    assert not vm.running


@pytest.mark.parametrize("kind", ["io", "mmio"])
def test_unhooked_range_is_unhandled_again(boot, io_log, kind):
    log = io_log(READ_VALUES)
    if kind == "io":
        vm = boot("pio", "protected", unhandled_io="stop", regs={"rdx": PORT})
        vm.hook_io(PORT, size=4, read=log.read, write=log.write)
        vm.unhook_io(PORT)
        address = PORT
    else:
        vm = boot("mmio_prot", "protected", unhandled_io="stop", regs={"rbx": MMIO_STOP_BASE})
        vm.hook_mmio(MMIO_STOP_BASE, 0x1000, read=log.read, write=log.write)
        vm.unhook_mmio(MMIO_STOP_BASE)
        address = MMIO_STOP_BASE

    exit = vm.run(timeout=HANG_GUARD)

    assert exit.reason == ExitReason.UNHANDLED_IO
    assert exit.details["address"] == address
    assert log.reads == log.writes == []


# --------------------------------------------------------------------------- stats


@pytest.mark.parametrize("kind", ["io", "mmio"])
def test_stats_count_handled_exits(boot, io_log, run_halt, kind):
    log = io_log(READ_VALUES)
    if kind == "io":
        vm = boot_pio(boot, "long")
        vm.hook_io(PORT, size=4, read=log.read, write=log.write)
        expected = {"io_exits": 6, "mmio_exits": 0}
    else:
        vm, base = boot_mmio(boot, "long")
        vm.hook_mmio(base, 0x1000, read=log.read, write=log.write)
        expected = {"io_exits": 0, "mmio_exits": 8}

    run_halt(vm)

    stats = vm.stats
    assert {key: stats[key] for key in expected} == expected
    assert (stats["unhandled_io"], stats["unhandled_mmio"]) == (0, 0)


# --------------------------------------------------------------------------- string, partial, failed I/O

CODE_ADDR = 0x1000
BUF = 0x2000
# Flat 32-bit code, written as bytes so that these tests need no assembler.
REP_INSB = bytes([0xFC, 0xF3, 0x6C, 0xF4])  # cld; rep insb (ecx bytes from port dx to [edi]); hlt
REP_OUTSW = bytes([0xFC, 0xF3, 0x66, 0x6F, 0xF4])  # cld; rep outsw (ecx words from [esi] to port dx); hlt
IN_AL = bytes([0xEC, 0xF4])  # in al, dx; hlt
OUT_EAX = bytes([0xEF, 0xF4])  # out dx, eax; hlt
IN_EAX_DX = bytes([0xED, 0xF4])  # in eax, dx; hlt


def raw_vm(make_vm, code, **regs):
    vm = make_vm()
    vm.mem_write(CODE_ADDR, code)
    cpu = vm.vcpus[0]
    cpu.setup("protected", entry=CODE_ADDR)
    for name, value in regs.items():
        cpu.reg_write(name, value)
    return vm


@pytest.mark.parametrize("count", [1, 17, 100, 5000])
def test_rep_ins_calls_the_read_handler_once_per_element(make_vm, run_halt, count):
    calls = []

    def read(port, size):
        calls.append((port, size))
        return len(calls) & 0xFF  # an int, one value per element

    vm = raw_vm(make_vm, REP_INSB, rdx=PORT, rdi=BUF, rcx=count)
    vm.hook_io(PORT, read=read)

    run_halt(vm)

    assert calls == [(PORT, 1)] * count
    assert vm.mem_read(BUF, count) == bytes(i & 0xFF for i in range(1, count + 1))
    assert vm.vcpus[0].reg_read("rcx") == 0


def test_rep_outs_calls_the_write_handler_once_per_element(make_vm, run_halt):
    words = [0x1111 * i for i in range(1, 10)]
    vm = raw_vm(make_vm, REP_OUTSW, rdx=PORT, rsi=BUF, rcx=len(words))
    vm.mem_write(BUF, b"".join(w.to_bytes(2, "little") for w in words))
    writes = []
    vm.hook_io(PORT, size=2, write=lambda port, data: writes.append((port, data)))

    run_halt(vm)

    assert writes == [(PORT, w.to_bytes(2, "little")) for w in words]


@pytest.mark.parametrize("policy", ["ignore", "stop"])
@pytest.mark.parametrize("code, write", [(OUT_EAX, True), (IN_EAX_DX, False)], ids=["out-4", "in-4"])
def test_access_past_the_end_of_a_hooked_range_stops_the_run(make_vm, policy, code, write):
    vm = raw_vm(lambda: make_vm(unhandled_io=policy), code, rdx=PORT)
    calls = []
    vm.hook_io(PORT, read=lambda *a: calls.append(a) or 0, write=lambda *a: calls.append(a))  # size=1

    exit = vm.run(timeout=HANG_GUARD)

    assert exit.reason == ExitReason.HANDLER_ERROR
    assert "4-byte" in exit.details["message"] and "only partly inside" in exit.details["message"]
    assert calls == []


def test_failed_in_is_served_again_on_resume(make_vm, run_halt):
    calls = []

    def read(port, size):
        calls.append(port)
        if len(calls) == 1:
            raise RuntimeError("not yet")
        return 0x77

    vm = raw_vm(make_vm, IN_AL, rax=0x1234, rdx=PORT)
    vm.hook_io(PORT, read=read)
    cpu = vm.vcpus[0]

    with pytest.raises(RuntimeError, match="not yet"):
        vm.run(timeout=HANG_GUARD)
    assert (cpu.reg_read("rip"), cpu.reg_read("rax")) == (CODE_ADDR, 0x1234)  # before the `in`

    run_halt(vm)

    assert calls == [PORT, PORT]
    assert cpu.reg_read("rax") == 0x1277


def test_failed_rep_ins_is_served_again_on_resume(make_vm, run_halt):
    calls = []

    def read(port, size):
        calls.append(port)
        if len(calls) == 3:
            raise RuntimeError("not yet")
        return 0xAB

    vm = raw_vm(make_vm, REP_INSB, rdx=PORT, rdi=BUF, rcx=8)
    vm.hook_io(PORT, read=read)

    with pytest.raises(RuntimeError):
        vm.run(timeout=HANG_GUARD)
    run_halt(vm)

    assert vm.mem_read(BUF, 9) == b"\xab" * 8 + b"\x00"
    assert vm.vcpus[0].reg_read("rcx") == 0


def test_unhandled_access_with_the_stop_policy_stays_pending(make_vm):
    vm = raw_vm(lambda: make_vm(unhandled_io="stop"), IN_AL, rax=0x1234, rdx=PORT)

    for _ in range(2):
        assert vm.run(timeout=HANG_GUARD).reason == ExitReason.UNHANDLED_IO
    vm.hook_io(PORT, read=lambda port, size: 0x42)
    assert vm.run(timeout=HANG_GUARD).reason == ExitReason.HLT
    assert vm.vcpus[0].reg_read("rax") == 0x1242


def test_failed_mmio_read_is_served_again_on_resume(make_vm, run_halt):
    calls = []

    def read(addr, size):
        calls.append((addr, size))
        if len(calls) == 1:
            raise RuntimeError("not yet")
        return 0x5A

    # mov al, [MMIO_STOP_BASE]; hlt
    vm = raw_vm(make_vm, b"\xa0" + MMIO_STOP_BASE.to_bytes(4, "little") + b"\xf4", rax=0x1100)
    vm.hook_mmio(MMIO_STOP_BASE, 0x1000, read=read)

    with pytest.raises(RuntimeError, match="not yet"):
        vm.run(timeout=HANG_GUARD)
    run_halt(vm)

    assert calls == [(MMIO_STOP_BASE, 1)] * 2
    assert vm.vcpus[0].reg_read("rax") == 0x115A
