"""Running, stopping, resuming and closing VMs; several vCPUs and several VMs at once."""

import gc
import os
import signal
import subprocess
import sys
import threading
import time

import kvmkit
import pytest
from kvmkit import ExitReason
from kvmkit.errors import VmStateError, WaitTimeout

pytestmark = [pytest.mark.kvm, pytest.mark.standard_kvm]

LOAD_ADDR = 0x1000
HANG_GUARD = 10.0  # a run that should end by itself gets this long before we call it a hang
PROMPT = 5.0  # "returns promptly": a hang guard, not a performance bound
PORT = 0xE9
M32 = 0xFFFF_FFFF


def percpu_result(index):
    """What percpu.S computes for vCPU `index`: EAX, sent to the port and stored at 0x2100 + 4 * index."""
    return 0xC0DE_0000 + (index + 1) * 0x111


def timed(fn, *args, **kwargs):
    start = time.monotonic()
    result = fn(*args, **kwargs)
    return result, time.monotonic() - start


class Boom(RuntimeError):
    pass


# --------------------------------------------------------------------------- halting and resuming


def test_resume_after_hlt(boot, assemble, run_halt):
    code = assemble("halt_twice")
    first_hlt, second_hlt = code.index(0xF4), code.rindex(0xF4)
    assert first_hlt != second_hlt
    vm = boot("halt_twice", "protected")
    cpu = vm.vcpus[0]

    run_halt(vm)
    assert (cpu.regs.rax & M32, cpu.regs.rip) == (1, LOAD_ADDR + first_hlt + 1)

    exit = run_halt(vm)
    assert (cpu.regs.rax & M32, cpu.regs.rip) == (2, LOAD_ADDR + second_hlt + 1)
    assert (list(exit.vcpu_reasons), vm.last_exit.reason) == ([ExitReason.HLT], ExitReason.HLT)


def test_triple_fault_is_shutdown(boot):
    vm = boot("triple_fault", "protected")

    exit = vm.run(timeout=HANG_GUARD)

    assert exit.reason == ExitReason.SHUTDOWN
    assert (exit.vcpu, list(exit.vcpu_reasons)) == (0, [ExitReason.SHUTDOWN])


def test_one_vcpu_ending_the_run_stops_the_others(make_vm, assemble):
    vm = make_vm(cpus=2)
    vm.mem_write(LOAD_ADDR, assemble("triple_fault"))
    vm.mem_write(0x3000, assemble("loop"))  # position independent
    vm.vcpus[0].setup("protected", entry=0x3000)
    vm.vcpus[1].setup("protected", entry=LOAD_ADDR)

    exit = vm.run(timeout=HANG_GUARD)

    assert (exit.reason, exit.vcpu) == (ExitReason.SHUTDOWN, 1)
    assert list(exit.vcpu_reasons) == [ExitReason.STOPPED, ExitReason.SHUTDOWN]
    assert not vm.running


# --------------------------------------------------------------------------- timeouts and stopping


def test_run_timeout_on_infinite_loop(boot):
    vm = boot("loop", "protected")

    for _ in range(2):  # and the VM can be run again after a timeout
        exit, elapsed = timed(vm.run, timeout=0.2)
        assert exit.reason == ExitReason.TIMEOUT
        assert 0.15 <= elapsed < PROMPT
        assert not vm.running
        assert vm.last_exit.reason == ExitReason.TIMEOUT
        assert vm.vcpus[0].regs.rip == LOAD_ADDR  # still spinning on `jmp .`


@pytest.mark.parametrize("cpus", [1, 2])
@pytest.mark.parametrize("how", ["run", "start-wait"])
def test_stop_from_another_thread(boot, how, cpus):
    vm = boot("loop", "protected", cpus=cpus)
    timer = threading.Timer(0.3, vm.stop)
    try:
        if how == "run":
            timer.start()
            exit = vm.run(timeout=HANG_GUARD)
        else:
            vm.start()
            assert vm.running
            timer.start()
            exit = vm.wait(timeout=HANG_GUARD)
    finally:
        timer.cancel()
        timer.join()

    assert exit.reason == ExitReason.STOPPED
    assert list(exit.vcpu_reasons) == [ExitReason.STOPPED] * cpus
    assert not vm.running


def test_wait_timeout_keeps_the_vm_running(boot):
    vm = boot("loop", "protected")
    vm.start()

    start = time.monotonic()
    with pytest.raises(WaitTimeout):
        vm.wait(timeout=0.1)
    assert time.monotonic() - start < PROMPT
    assert vm.running

    vm.stop()
    assert vm.wait(timeout=HANG_GUARD).reason == ExitReason.STOPPED
    assert not vm.running


@pytest.mark.parametrize("verb", ["stop", "close"])
def test_stop_from_a_handler(boot, verb):
    vm = boot("pio_read_loop", "protected", regs={"rdx": PORT})
    calls = []

    def read(port, size):
        calls.append((port, size))
        if len(calls) == 3:
            getattr(vm, verb)()
        return len(calls)

    vm.hook_io(PORT, size=4, read=read)

    exit = vm.run(timeout=HANG_GUARD)

    assert exit.reason == ExitReason.STOPPED
    assert vm.closed == (verb == "close")
    assert calls[:3] == [(PORT, 4)] * 3
    assert len(calls) <= 4  # the guest reads forever: the run ended because of stop()


@pytest.mark.parametrize("what", ["start", "run"])
def test_starting_a_running_vm_is_rejected(boot, what):
    vm = boot("loop", "protected")
    vm.start()

    with pytest.raises(VmStateError):
        if what == "start":
            vm.start()
        else:
            vm.run(timeout=0.1)
    assert vm.running


@pytest.mark.parametrize("how", ["run", "start-wait"])
@pytest.mark.parametrize("cpus", [1, 2])
def test_ctrl_c_stops_the_vm(boot, how, cpus):
    vm = boot("loop", "protected", cpus=cpus)
    ctrl_c_during(vm, how, within=PROMPT)  # not just raised after the run timed out
    assert not vm.running


def ctrl_c_during(vm, how: str, within: float) -> None:
    """Runs ``vm`` (``how``: "run", or "start-wait") and presses Ctrl-C 0.3 s in; asserts that
    KeyboardInterrupt comes out within ``within`` seconds."""
    assert threading.current_thread() is threading.main_thread(), "signals are delivered to the main thread"
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.3, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
    try:
        start = time.monotonic()
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            if how == "run":
                vm.run(timeout=HANG_GUARD)
            else:
                vm.start()
                vm.wait(timeout=HANG_GUARD)
        assert time.monotonic() - start < within
    finally:
        timer.cancel()
        timer.join()
        signal.signal(signal.SIGINT, previous)


# --------------------------------------------------------------------------- handler errors


@pytest.mark.parametrize("how", ["run", "start-wait"])
@pytest.mark.parametrize("side", ["read", "write"])
def test_handler_exception_propagates(boot, assemble, side, how):
    code = assemble("pio")
    vm = boot("pio", "protected", regs={"rdx": PORT})
    raised = []

    def boom(*args):
        raised.append(Boom("boom"))
        raise raised[-1]

    handlers = {"read": lambda port, size: 0, "write": lambda port, data: None}
    handlers[side] = boom
    vm.hook_io(PORT, size=4, **handlers)

    with pytest.raises(Boom, match=r"^boom$") as info:
        if how == "run":
            vm.run(timeout=HANG_GUARD)
        else:
            vm.start()
            vm.wait(timeout=HANG_GUARD)

    assert info.value is raised[0]
    assert len(raised) == 1  # the VM stopped at the first failure
    assert (vm.last_exit.reason, vm.last_exit.vcpu) == (ExitReason.HANDLER_ERROR, 0)
    assert not vm.running
    regs = vm.vcpus[0].regs
    assert regs.rdx & 0xFFFF == PORT
    assert LOAD_ADDR <= regs.rip < LOAD_ADDR + len(code)
    vm.close()
    assert not vm.running


# --------------------------------------------------------------------------- concurrency


@pytest.mark.parametrize("cpus", [2, 4])
def test_vcpus_run_at_once(boot, run_halt, cpus):
    # percpu.S spins until every vCPU has arrived, so vCPUs run one after the other would time out.
    vm = boot("percpu", "protected", cpus=cpus, regs={"rcx": cpus, "rdx": PORT})
    for cpu in vm.vcpus:
        cpu.reg_write("rsi", cpu.index)
    reports = []
    vm.hook_io(PORT, size=4, write=lambda port, data: reports.append(int.from_bytes(data, "little")))

    exit = run_halt(vm)

    expected = [percpu_result(i) for i in range(cpus)]
    assert sorted(reports) == expected
    assert [cpu.regs.rax & M32 for cpu in vm.vcpus] == expected
    assert vm.mem_read(0x2100, 4 * cpus) == b"".join(value.to_bytes(4, "little") for value in expected)
    assert vm.mem_read(0x2000, 4) == cpus.to_bytes(4, "little")
    assert list(exit.vcpu_reasons) == [ExitReason.HLT] * cpus


def test_vms_run_concurrently_in_threads(boot):
    count = 3
    # Every VM's handler waits until all VMs are inside their handlers at the same time.
    barrier = threading.Barrier(count, timeout=HANG_GUARD / 2)
    vms = [boot("percpu", "protected", regs={"rsi": k, "rcx": 1, "rdx": PORT}) for k in range(count)]
    reports = [[] for _ in range(count)]
    for k, vm in enumerate(vms):

        def write(port, data, k=k):
            reports[k].append(int.from_bytes(data, "little"))
            barrier.wait()

        vm.hook_io(PORT, size=4, write=write)

    exits, errors = [None] * count, []

    def run(k):
        try:
            exits[k] = vms[k].run(timeout=HANG_GUARD)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(2 * HANG_GUARD)

    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert [exit.reason for exit in exits] == [ExitReason.HLT] * count
    assert reports == [[percpu_result(k)] for k in range(count)]
    assert [vm.mem_read(0x2100 + 4 * k, 4) for k, vm in enumerate(vms)] == [
        percpu_result(k).to_bytes(4, "little") for k in range(count)
    ]


# --------------------------------------------------------------------------- closing


@pytest.mark.parametrize("state", ["halted", "running"])
def test_context_manager_closes_the_vm(kvm_available, assemble, state):
    reads = []
    with kvmkit.VM(memory="2M") as vm:
        assert isinstance(vm, kvmkit.VM)
        cpu = vm.vcpus[0]
        if state == "halted":
            vm.mem_write(LOAD_ADDR, assemble("halt_twice"))
            cpu.setup("protected", entry=LOAD_ADDR)
            assert vm.run(timeout=HANG_GUARD).reason == ExitReason.HLT
        else:  # leave the block while the guest is still reading a port in a loop
            vm.mem_write(LOAD_ADDR, assemble("pio_read_loop"))
            cpu.setup("protected", entry=LOAD_ADDR)
            cpu.reg_write("rdx", PORT)
            vm.hook_io(PORT, size=4, read=lambda port, size: reads.append(port) or 0)
            vm.start()
            assert vm.running

    assert not vm.running
    seen = len(reads)
    time.sleep(0.2)
    assert len(reads) == seen  # the guest no longer runs after close
    with pytest.raises(VmStateError):
        vm.mem_read(0, 1)
    with pytest.raises(VmStateError):
        _ = cpu.regs


def task_count():
    return len(os.listdir("/proc/self/task"))


def steady(count, within=PROMPT):
    """`count()` once it has not changed for 0.3 s: threads of earlier tests' VMs may still be
    ending, and a baseline taken while they do would be off."""
    deadline = time.monotonic() + within
    last, since = count(), time.monotonic()
    while time.monotonic() - since < 0.3 and time.monotonic() < deadline:
        time.sleep(0.02)
        now = count()
        if now != last:
            last, since = now, time.monotonic()
    return last


def settles_at(expected, count, within=PROMPT):
    """Waits for `count()` to reach `expected` (threads end a little after a VM is freed)."""
    deadline = time.monotonic() + within
    while count() != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return count()


@pytest.mark.watchdog(30)
@pytest.mark.parametrize("how", ["close", "drop"])
def test_handler_frees_its_own_started_vm(kvm_available, assemble, how):
    tasks = steady(task_count)
    holder = [kvmkit.VM(memory="2M")]  # not the boot fixture, which keeps a reference
    holder[0].mem_write(LOAD_ADDR, assemble("pio_read_loop"))
    holder[0].vcpus[0].setup("protected", entry=LOAD_ADDR)
    holder[0].vcpus[0].reg_write("rdx", PORT)
    done = threading.Event()

    def read(port, size):
        if how == "close":
            holder[0].close()
        else:
            holder.clear()  # the last reference to the VM: the handler drops it
        done.set()
        return 0

    holder[0].hook_io(PORT, size=4, read=read)
    holder[0].start()
    closed = holder[0] if how == "close" else None

    assert done.wait(HANG_GUARD), "the handler did not return from freeing its own VM"
    assert settles_at(tasks, task_count) == tasks  # the vCPU thread ended
    if closed is not None:
        assert closed.closed


@pytest.mark.watchdog(30)
@pytest.mark.parametrize("how", ["run", "start-wait"])
def test_wait_from_a_handler_raises(boot, how):
    vm = boot("pio_read_loop", "protected", regs={"rdx": PORT})
    vm.hook_io(PORT, size=4, read=lambda port, size: vm.wait(timeout=HANG_GUARD))

    with pytest.raises(VmStateError, match="handler cannot wait"):
        if how == "run":
            vm.run(timeout=HANG_GUARD)
        else:
            vm.start()
            vm.wait(timeout=HANG_GUARD)
    assert not vm.running


# --------------------------------------------------------------------------- slow handlers


def blocking_handler(vm, release):
    """A read handler that blocks until `release` is set; returns the list of calls it started."""
    started = []

    def read(port, size):
        started.append(port)
        release.wait(HANG_GUARD)
        return 0

    vm.hook_io(PORT, size=4, read=read)
    return started


@pytest.mark.watchdog(30)
def test_timeout_ends_run_during_a_slow_handler(boot):
    vm = boot("pio_read_loop", "protected", regs={"rdx": PORT})
    release = threading.Event()
    started = blocking_handler(vm, release)
    try:
        exit, took = timed(vm.run, timeout=0.3)
        assert exit.reason == ExitReason.TIMEOUT
        assert took < 2.0  # the handler blocks for HANG_GUARD
        assert started == [PORT]
        # The handler's vCPU still finishes its call: the VM runs until then.
        assert vm.running
        assert exit.vcpu_reasons == []
        with pytest.raises(VmStateError):
            _ = vm.vcpus[0].regs
    finally:
        release.set()
    final = vm.wait(timeout=HANG_GUARD)
    assert final.reason == ExitReason.TIMEOUT
    assert final.vcpu_reasons == [ExitReason.STOPPED]
    assert not vm.running
    assert len(started) == 1  # it stopped right after the call
    assert vm.vcpus[0].regs.rip  # usable again


@pytest.mark.watchdog(30)
@pytest.mark.parametrize("how", ["run", "start-wait"])
def test_ctrl_c_ends_run_during_a_slow_handler(boot, how):
    vm = boot("pio_read_loop", "protected", cpus=2, regs={"rdx": PORT})
    release = threading.Event()
    blocking_handler(vm, release)
    try:
        ctrl_c_during(vm, how, within=2.0)  # the handlers block for HANG_GUARD
        assert vm.running
    finally:
        release.set()
    assert vm.wait(timeout=HANG_GUARD).reason == ExitReason.STOPPED
    assert not vm.running


# --------------------------------------------------------------------------- freeing


def fd_count():
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.watchdog(60)
def test_vms_whose_handlers_refer_to_them_are_collected(kvm_available, assemble):
    guest = assemble("pio_read_loop")

    def make(started, raising=False):
        vm = kvmkit.VM(memory="2M")
        vm.mem_write(LOAD_ADDR, guest)
        vm.vcpus[0].setup("protected", entry=LOAD_ADDR)
        vm.vcpus[0].reg_write("rdx", PORT)

        # Handlers that refer to their VM: the cycle runs through the Rust side.
        def read(port, size):
            if raising:  # kept for a wait() that never comes; its traceback leads to the VM
                raise Boom(f"from {vm!r}")
            return 0 if vm.running else 1

        vm.hook_io(PORT, size=4, read=read)
        vm.hook_io(0x80, write=lambda addr, data: vm.stop())
        if started:
            vm.start()  # spins in the guest, calling the handler

    make(False)  # the process-wide KVM handle stays open: not counted
    gc.collect()
    fds, tasks = fd_count(), steady(task_count)

    def churn(index):
        for i in range(6):
            make(started=(index + i) % 2 == 1, raising=i % 3 == 0)

    threads = [threading.Thread(target=churn, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    def after_collection(count):
        def collected():
            gc.collect()
            return count()

        return collected

    assert settles_at(fds, after_collection(fd_count), within=HANG_GUARD) == fds
    assert settles_at(tasks, after_collection(task_count), within=HANG_GUARD) == tasks


UNCLOSED_AT_EXIT = """
import kvmkit
from kvmkit import _core
vm = _core.Vm(_core.ram_regions(2 << 20), 1, False, False, "ignore", [])  # not closed at exit
vm.mem_write(0x1000, bytes.fromhex("ebfe"))  # jmp $
kvmkit.Vcpu(vm, 0).setup("real", entry=0x1000)
vm.add_handler("pio", 0x80, 1, None, lambda addr, data: vm.stop())  # collectable at shutdown
vm.start()
"""


@pytest.mark.watchdog(60)
def test_process_exits_with_a_collectable_vm_still_running(kvm_available):
    done = subprocess.run([sys.executable, "-c", UNCLOSED_AT_EXIT], capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
