"""Driving VMs from an asyncio event loop: the run's end wakes the loop through an eventfd."""

import asyncio
import resource

import kvmkit
import pytest
from kvmkit import ExitReason
from kvmkit.errors import WaitTimeout

pytestmark = [pytest.mark.kvm, pytest.mark.standard_kvm]

LOAD_ADDR = 0x1000
MANY = 500
HANG_GUARD = 60.0


class Boom(RuntimeError):
    pass


def guest_vm(code: bytes, **kwargs) -> kvmkit.VM:
    vm = kvmkit.VM(memory="2M", **kwargs)
    vm.mem_write(LOAD_ADDR, code)
    vm.vcpus[0].setup("protected", entry=LOAD_ADDR)
    return vm


def test_one_event_loop_drives_500_vms_at_once(kvm_available, assemble):
    """Every VM runs on its own vCPU thread while one loop waits for all of them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8 * MANY)), hard))
    code = assemble("halt_twice")
    vms = [guest_vm(code) for _ in range(MANY)]
    try:

        async def main() -> list[kvmkit.Exit]:
            return await asyncio.wait_for(asyncio.gather(*(vm.run_async() for vm in vms)), HANG_GUARD)

        exits = asyncio.run(main())
        assert [e.reason for e in exits] == [ExitReason.HLT] * MANY
        assert all(vm.vcpus[0].regs.rax & 0xFFFF_FFFF == 1 for vm in vms)
        exits = asyncio.run(main())  # and again: each resumes past its first HLT
        assert all(vm.vcpus[0].regs.rax & 0xFFFF_FFFF == 2 for vm in vms)
    finally:
        for vm in vms:
            vm.close()


def test_run_async_times_out_and_the_loop_stays_free(kvm_available, assemble):
    async def main() -> tuple[kvmkit.Exit, int]:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        async with guest_vm(assemble("loop")) as vm:
            exit_ = await vm.run_async(timeout=0.5)
        ticker.cancel()
        return exit_, ticks

    exit_, ticks = asyncio.run(main())
    assert exit_.reason is ExitReason.TIMEOUT
    assert ticks >= 10, "the loop kept running while the VM did"


def test_wait_async_raises_timeouts_and_handler_exceptions(kvm_available, assemble):
    async def main() -> None:
        vm = guest_vm(assemble("loop"))
        vm.start()
        with pytest.raises(WaitTimeout):
            await vm.wait_async(timeout=0.2)
        assert vm.running
        vm.stop()
        assert (await vm.wait_async(timeout=HANG_GUARD)).reason is ExitReason.STOPPED
        vm.close()

        def fail(port: int, data: bytes) -> None:
            raise Boom("from the handler")

        vm = guest_vm(assemble("pio"), unhandled_io="stop")
        vm.vcpus[0].reg_write("rdx", 0xE9)
        vm.hook_io(0xE9, 4, write=fail)
        with pytest.raises(Boom):
            await vm.run_async(timeout=HANG_GUARD)
        vm.close()

    asyncio.run(main())


def test_cancelling_run_async_stops_the_vm(kvm_available, assemble):
    async def main() -> kvmkit.VM:
        vm = guest_vm(assemble("loop"))
        task = asyncio.create_task(vm.run_async())
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return vm

    vm = asyncio.run(main())
    assert vm.wait(timeout=HANG_GUARD).reason is ExitReason.STOPPED
    vm.close()


def test_console_expect_async_waits_on_the_console_without_blocking(kvm_available, assemble):
    from kvmkit.console import EOF

    async def main() -> None:
        async with kvmkit.VM(memory="64M", irqchip=True, pit=True) as vm:
            console = vm.boot_linux(assemble("pvh_platform", elf=True), cmdline="from asyncio")
            vm.start()
            match = await console.expect_async(rb"cmdline=([\w ]+) memmap", timeout=HANG_GUARD)
            assert match.group(1) == b"from asyncio"
            console.write("typed.")  # echoed, then the guest powers off
            # Two tasks wait on the same VM at once: both wake when it stops.
            index, exit_ = await asyncio.gather(
                console.expect_async([b"never", EOF], timeout=HANG_GUARD), vm.wait_async(timeout=HANG_GUARD)
            )
            assert (index, exit_.reason) == (1, ExitReason.POWEROFF)
            assert b"typed" in console.before

    asyncio.run(main())
