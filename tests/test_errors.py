"""Bad inputs and bad states raise the specific typed errors of kvmkit.errors."""

import threading
import time

import pytest
from kvmkit import ExitReason, devices
from kvmkit.errors import (
    ConfigError,
    GuestMemoryError,
    IoRangeConflictError,
    KvmCapabilityError,
    KvmError,
    KvmkitError,
    KvmUnavailableError,
    VmStateError,
    WaitTimeout,
)

LOAD_ADDR = 0x1000
HANG_GUARD = 10.0
PORT = 0x60
MMIO = 0xD000_0000
MEM_SIZE = 2 << 20


def nop_read(addr, size):
    return 0


# --------------------------------------------------------------------------- hierarchy (no KVM needed)


@pytest.mark.parametrize(
    "cls",
    [
        KvmUnavailableError,
        KvmCapabilityError,
        ConfigError,
        IoRangeConflictError,
        GuestMemoryError,
        VmStateError,
        KvmError,
        WaitTimeout,
    ],
)
def test_errors_derive_from_kvmkit_error(cls):
    assert issubclass(cls, KvmkitError)
    assert issubclass(KvmkitError, Exception)


def test_io_range_conflict_is_a_config_error():
    assert issubclass(IoRangeConflictError, ConfigError)


# --------------------------------------------------------------------------- VM configuration


@pytest.mark.kvm
@pytest.mark.parametrize(
    "memory",
    [
        0,
        "0M",
        "abc",
        "",
        "12Q",
        -1,
        "-1M",
        [],  # no region at all
        [(0x800, "1M")],  # region address not page aligned
        [(0, 1000)],  # region size not page aligned
        [(0, "1M"), (0x80000, "1M")],
    ],  # overlapping regions
    ids=repr,
)
def test_bad_memory_is_a_config_error(make_vm, memory):
    with pytest.raises(ConfigError):
        make_vm(memory=memory)


@pytest.mark.kvm
@pytest.mark.parametrize("cpus", [0, 100_000])
def test_bad_cpu_count_is_a_config_error(make_vm, cpus):
    with pytest.raises(ConfigError):
        make_vm(memory="2M", cpus=cpus)


@pytest.mark.kvm
def test_bad_unhandled_io_policy_is_a_config_error(make_vm):
    with pytest.raises(ConfigError):
        make_vm(memory="2M", unhandled_io="explode")


@pytest.mark.parametrize(
    "mode, entry",
    [("v86", LOAD_ADDR), ("", LOAD_ADDR), ("real", 0x10_0000)],  # real mode can only enter below 1 MiB
    ids=["unknown-mode", "empty-mode", "real-entry-above-1M"],
)
def test_bad_setup_is_a_config_error(make_vm, mode, entry):
    cpu = make_vm().vcpus[0]

    with pytest.raises(ConfigError):
        cpu.setup(mode, entry=entry)


# --------------------------------------------------------------------------- I/O map


CONFLICTS = {
    "io-same-start": (
        lambda vm: vm.hook_io(PORT, size=4, read=nop_read),
        lambda vm: vm.hook_io(PORT, size=1, read=nop_read),
    ),
    "io-inside": (
        lambda vm: vm.hook_io(PORT, size=4, read=nop_read),
        lambda vm: vm.hook_io(PORT + 3, size=1, read=nop_read),
    ),
    "io-straddling-start": (
        lambda vm: vm.hook_io(PORT, size=4, read=nop_read),
        lambda vm: vm.hook_io(PORT - 1, size=2, read=nop_read),
    ),
    "io-device-over-hook": (
        lambda vm: vm.hook_io(PORT, size=4, read=nop_read),
        lambda vm: vm.add_io_device(PORT + 2, 1, devices.Null()),
    ),
    "mmio-straddling-end": (
        lambda vm: vm.hook_mmio(MMIO, 0x1000, read=nop_read),
        lambda vm: vm.hook_mmio(MMIO + 0xFFF, 0x10, read=nop_read),
    ),
    "mmio-hook-over-device": (
        lambda vm: vm.add_mmio_device(MMIO, 16, devices.Scratchpad(16)),
        lambda vm: vm.hook_mmio(MMIO + 8, 8, read=nop_read),
    ),
}


@pytest.mark.parametrize("case", CONFLICTS)
def test_overlapping_ranges_conflict(make_vm, case):
    first, second = CONFLICTS[case]
    vm = make_vm()
    first(vm)

    with pytest.raises(IoRangeConflictError) as info:
        second(vm)
    assert isinstance(info.value, ConfigError)


NO_CONFLICTS = {
    "adjacent-io": [
        lambda vm: vm.hook_io(PORT, size=4, read=nop_read),
        lambda vm: vm.hook_io(PORT + 4, size=4, read=nop_read),
        lambda vm: vm.hook_io(PORT - 1, size=1, read=nop_read),
    ],
    "adjacent-mmio": [
        lambda vm: vm.hook_mmio(MMIO, 0x1000, read=nop_read),
        lambda vm: vm.add_mmio_device(MMIO + 0x1000, 16, devices.Scratchpad(16)),
    ],
    "rehook-after-unhook": [
        lambda vm: vm.hook_io(PORT, size=4, read=nop_read),
        lambda vm: vm.unhook_io(PORT),
        lambda vm: vm.hook_io(PORT, size=4, read=nop_read),
    ],
}


@pytest.mark.parametrize("case", NO_CONFLICTS)
def test_non_overlapping_ranges_are_accepted(make_vm, case):
    vm = make_vm()
    for step in NO_CONFLICTS[case]:
        step(vm)


# --------------------------------------------------------------------------- guest memory


MEM_OUT_OF_RANGE = {
    "read-past-end": lambda vm: vm.mem_read(MEM_SIZE, 1),
    "read-across-end": lambda vm: vm.mem_read(MEM_SIZE - 8, 16),
    "read-far-away": lambda vm: vm.mem_read(1 << 40, 1),
    "write-past-end": lambda vm: vm.mem_write(MEM_SIZE, b"x"),
    "write-across-end": lambda vm: vm.mem_write(MEM_SIZE - 4, b"12345678"),
    "view-past-end": lambda vm: vm.mem_view(MEM_SIZE, 1),
    "view-across-end": lambda vm: vm.mem_view(MEM_SIZE - 8, 16),
}


@pytest.mark.parametrize("case", MEM_OUT_OF_RANGE)
def test_memory_access_outside_guest_memory(make_vm, case):
    vm = make_vm(memory=MEM_SIZE)
    assert vm.mem_read(MEM_SIZE - 8, 8) == bytes(8)  # the last bytes themselves are fine

    with pytest.raises(GuestMemoryError):
        MEM_OUT_OF_RANGE[case](vm)


GAP_CASES = {
    "read-in-gap": lambda vm: vm.mem_read(0x10_0000, 1),
    "read-into-gap": lambda vm: vm.mem_read(0x10_0000 - 8, 16),
    "write-into-gap": lambda vm: vm.mem_write(0x10_0000 - 4, b"12345678"),
    "read-from-gap": lambda vm: vm.mem_read(0x20_0000 - 8, 16),
    "view-across-adjacent-regions": lambda vm: vm.mem_view(
        0x30_0000 - 8, 16
    ),  # a view stays within one region
}


@pytest.mark.parametrize("case", GAP_CASES)
def test_memory_access_between_regions(make_vm, case):
    # [0, 1M) and [2M, 3M) are separate, [2M, 3M) and [3M, 4M) are adjacent but separate regions.
    vm = make_vm(memory=[(0, "1M"), (0x20_0000, "1M"), (0x30_0000, "1M")])
    vm.mem_write(0x30_0000 - 4, b"abcd")  # the end of the middle region is fine
    vm.mem_write(0x30_0000, b"efgh")

    with pytest.raises(GuestMemoryError):
        GAP_CASES[case](vm)


# --------------------------------------------------------------------------- state


WHILE_RUNNING = {
    "hook_io": lambda vm: vm.hook_io(PORT + 8, size=1, read=nop_read),
    "hook_mmio": lambda vm: vm.hook_mmio(MMIO + 0x1000, 0x1000, read=nop_read),
    "add_io_device": lambda vm: vm.add_io_device(PORT + 8, 1, devices.Null()),
    "add_mmio_device": lambda vm: vm.add_mmio_device(MMIO + 0x1000, 16, devices.Scratchpad(16)),
    "unhook_io": lambda vm: vm.unhook_io(PORT),
    "unhook_mmio": lambda vm: vm.unhook_mmio(MMIO),
}


@pytest.mark.parametrize("op", WHILE_RUNNING)
def test_changing_the_io_map_while_running(boot, op):
    vm = boot("loop", "protected")
    vm.hook_io(PORT, size=1, read=nop_read)
    vm.hook_mmio(MMIO, 0x1000, read=nop_read)
    vm.start()
    assert vm.running

    with pytest.raises(VmStateError):
        WHILE_RUNNING[op](vm)
    assert vm.running


AFTER_CLOSE = {
    "mem_read": lambda vm, cpu: vm.mem_read(LOAD_ADDR, 1),
    "mem_write": lambda vm, cpu: vm.mem_write(LOAD_ADDR, b"\xf4"),
    "mem_view": lambda vm, cpu: vm.mem_view(LOAD_ADDR, 1),
    "run": lambda vm, cpu: vm.run(timeout=1),
    "start": lambda vm, cpu: vm.start(),
    "hook_io": lambda vm, cpu: vm.hook_io(PORT, size=1, read=nop_read),
    "hook_mmio": lambda vm, cpu: vm.hook_mmio(MMIO, 0x1000, read=nop_read),
    "add_io_device": lambda vm, cpu: vm.add_io_device(PORT, 1, devices.Null()),
    "setup": lambda vm, cpu: cpu.setup("protected", entry=LOAD_ADDR),
    "regs": lambda vm, cpu: cpu.regs,
    "reg_write": lambda vm, cpu: cpu.reg_write("rax", 1),
    "sregs": lambda vm, cpu: cpu.sregs,
    "msr_read": lambda vm, cpu: cpu.msr_read(0x174),
}


@pytest.mark.parametrize("op", AFTER_CLOSE)
def test_operations_after_close(boot, op):
    vm = boot("halt_twice", "protected")
    cpu = vm.vcpus[0]
    vm.close()

    assert not vm.running
    with pytest.raises(VmStateError):
        AFTER_CLOSE[op](vm, cpu)


@pytest.mark.parametrize(
    "kind, value", [("io", "x"), ("io", 1.5), ("mmio", "x")], ids=["io-str", "io-float", "mmio-str"]
)
def test_read_handler_returning_a_wrong_type(boot, kind, value):
    if kind == "io":
        vm = boot("pio_read_loop", "protected", regs={"rdx": PORT})
        vm.hook_io(PORT, size=4, read=lambda port, size: value)
    else:
        vm = boot("mmio_long", "long", regs={"rbx": MMIO})
        vm.hook_mmio(MMIO, 0x1000, read=lambda addr, size: value, write=lambda addr, data: None)

    with pytest.raises(TypeError):
        vm.run(timeout=HANG_GUARD)
    assert not vm.running


# --------------------------------------------------------------------------- arguments at their limits


@pytest.mark.parametrize("size", [0, 2**24 + 1, 2**62, 2**63 - 1])
def test_scratchpad_sizes_beyond_the_limit_are_config_errors(size):
    with pytest.raises(ConfigError, match="scratchpad"):
        devices.Scratchpad(size)


@pytest.mark.kvm
@pytest.mark.parametrize("timeout", [1e19, 1.7e308, float(2**64), float("inf")])
def test_huge_timeouts_wait_without_end(boot, timeout):
    vm = boot("loop", "protected")
    vm.start()
    with pytest.raises(WaitTimeout):
        vm.wait(0.05)
    stopper = threading.Timer(0.2, vm.stop)
    stopper.start()
    try:
        assert vm.wait(timeout).reason == ExitReason.STOPPED
        stopper = threading.Timer(0.2, vm.stop)
        stopper.start()
        assert vm.run(timeout=timeout).reason == ExitReason.STOPPED
    finally:
        stopper.cancel()


@pytest.mark.kvm
@pytest.mark.parametrize("timeout", [-1.0, -1e19, float("nan"), float("-inf")])
def test_impossible_timeouts_are_config_errors(boot, timeout):
    vm = boot("halt_twice", "protected")
    with pytest.raises(ConfigError):
        vm.run(timeout=timeout)
    vm.start()
    with pytest.raises(ConfigError):
        vm.wait(timeout)
    vm.stop()


@pytest.mark.kvm
@pytest.mark.parametrize("memory", [None, 3.5, object(), [(0,)], [("1M", 0)], True], ids=repr)
def test_memory_of_the_wrong_kind_says_what_it_expects(make_vm, memory):
    with pytest.raises(ConfigError, match="memory must be a size"):
        make_vm(memory=memory)


@pytest.mark.kvm
@pytest.mark.parametrize("hook", ["hook_io", "hook_mmio"])
@pytest.mark.parametrize("role", ["read", "write"])
@pytest.mark.parametrize("handler", [5, "print", b""], ids=repr)
def test_handlers_that_cannot_be_called_are_refused_at_once(make_vm, hook, role, handler):
    vm = make_vm()
    address = PORT if hook == "hook_io" else MMIO
    with pytest.raises(TypeError, match=f"{role} handler must be callable"):
        getattr(vm, hook)(address, 1, **{role: handler})
    getattr(vm, hook)(address, 1, **{role: nop_read})  # nothing was mapped


@pytest.mark.kvm
@pytest.mark.parametrize(
    "map_it",
    [
        lambda vm: vm.hook_mmio(0x1000, 0x1000, read=nop_read),
        lambda vm: vm.hook_mmio(MEM_SIZE - 1, 2, read=nop_read),
        lambda vm: vm.add_mmio_device(0, 16, devices.Scratchpad(16)),
    ],
    ids=["hook-inside", "hook-across-the-end", "device"],
)
def test_mmio_over_guest_ram_is_refused(make_vm, map_it):
    vm = make_vm(memory=MEM_SIZE)
    with pytest.raises(ConfigError, match="overlaps guest RAM"):
        map_it(vm)
    vm.hook_mmio(MEM_SIZE, 0x1000, read=nop_read)  # right after RAM is fine


@pytest.mark.kvm
@pytest.mark.parametrize("size", [4 << 30, (1 << 63) - 1])
def test_mem_read_larger_than_guest_memory_fails_before_allocating(make_vm, size):
    vm = make_vm(memory=MEM_SIZE)
    started = time.monotonic()
    with pytest.raises(GuestMemoryError):
        vm.mem_read(0, size)
    assert time.monotonic() - started < 1
