"""Snapshots of the default Linux guest on a KVM with hardware semantics: restore in place, restore
from files in another process, and forks that each go their own way with the right time and
their own randomness.

One guest is booted for the module (a boot costs about 20 s in the nested machine); every test
leaves it running at its shell.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import kvmkit
import pytest
from kvmkit.images import READY_MARKER, GuestImage
from support import in_netns, ip, network_namespace

pytestmark = [pytest.mark.hw_kvm, pytest.mark.watchdog(900)]

MEMORY = 256 << 20
BOOT_TIMEOUT = 300
SHELL_TIMEOUT = 60
CLOCK_SLACK = 1.0  # seconds the guest's clock may be off the host's after a restore or fork


@pytest.fixture(scope="module")
def guest() -> GuestImage:
    from kvmkit.images import default_guest

    return default_guest()


@pytest.fixture(scope="module")
def linux(guest) -> Iterator[kvmkit.VM]:
    with kvmkit.VM(memory=MEMORY, cpus=1, irqchip=True, pit=True) as vm:
        vm.add_rng()
        console = vm.boot_linux(guest.vmlinux, initrd=guest.initrd, cmdline=guest.cmdline)
        vm.start()
        console.expect(READY_MARKER.encode(), timeout=BOOT_TIMEOUT)
        yield vm


def shell(vm: kvmkit.VM, command: str, answer: str) -> bytes:
    """Runs ``command`` at the guest's shell and returns the first group of ``answer``, a regex
    for a whole line of output (so that a number is not cut short while it still arrives).
    Commands print through ``$(...)`` or arithmetic, so the echoed command line never matches."""
    vm.console.sendline(command)
    return vm.console.expect(answer.encode() + rb"\r?\n", timeout=SHELL_TIMEOUT).group(1)


def guest_clock_error(vm: kvmkit.VM) -> float:
    """How far the guest's wall clock is from the host's, in seconds. busybox's ``date`` gives
    whole seconds: the guest's time lies in ``[now, now + 1)``, and the host's between the
    command and its answer."""
    before = time.time()
    guest_now = int(shell(vm, "echo now=$(date +%s)", r"now=(\d+)"))
    after = time.time()
    return max(0.0, before - (guest_now + 1), guest_now - after)


def test_a_restore_brings_the_shell_state_back(linux):
    shell(linux, "echo one > /tmp/state; echo wrote=$((1+1))", r"wrote=(2)")
    linux.pause()
    snap = linux.snapshot()
    linux.resume()
    shell(linux, "echo two > /tmp/state; echo wrote=$((2+2))", r"wrote=(4)")
    assert shell(linux, "echo state=$(cat /tmp/state)", r"state=(\w+)") == b"two"
    for _ in range(2):
        linux.pause()
        linux.restore(snap)
        linux.resume()
        assert shell(linux, "echo state=$(cat /tmp/state)", r"state=(\w+)") == b"one"
        shell(linux, "echo three > /tmp/state; echo wrote=$((3+3))", r"wrote=(6)")


def test_the_clock_is_right_after_a_restore_of_an_old_snapshot(linux):
    linux.pause()
    snap = linux.snapshot()
    linux.resume()
    time.sleep(3)
    linux.pause()
    linux.restore(snap)
    linux.resume()
    assert guest_clock_error(linux) <= CLOCK_SLACK


def test_a_saved_snapshot_answers_in_another_process(linux, tmp_path):
    shell(linux, "echo saved > /tmp/state; echo wrote=$((5+5))", r"wrote=(10)")
    linux.pause()
    linux.snapshot().save(tmp_path / "snap")
    linux.resume()
    script = textwrap.dedent(
        f"""
        import kvmkit
        vm = kvmkit.VM.from_snapshot({str(tmp_path / "snap")!r})
        vm.start()
        vm.console.sendline("echo state=$(cat /tmp/state)")
        print(vm.console.expect(rb"state=(\\w+)\\r?\\n", timeout={SHELL_TIMEOUT}).group(1).decode())
        vm.close()
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "saved"


@pytest.fixture(scope="module")
def generic_kernel() -> Path:
    """Debian's generic kernel (the nested machine's), which has the ``vmgenid`` driver built in;
    the default guest's cloud kernel is built without it, so its forks would not reseed."""
    from kvmkit import nested

    return nested.prepare().kernel


def test_forks_run_their_own_commands_with_the_right_time_and_their_own_randomness(guest, generic_kernel):
    with kvmkit.VM(memory=MEMORY, cpus=1, irqchip=True, pit=True) as parent:
        console = parent.boot_linux(generic_kernel, initrd=guest.initrd, cmdline=f"{guest.cmdline} quiet")
        parent.start()
        console.expect(READY_MARKER.encode(), timeout=BOOT_TIMEOUT)
        # Linux reseeds on a new generation id only once its generator is ready.
        shell(
            parent,
            "until dmesg | grep -q 'crng init done'; do sleep 1; done; echo ready=$((1 + 1))",
            r"ready=(2)",
        )
        clones = parent.fork(4)
        try:
            for clone in clones:
                clone.start()
            for index, clone in enumerate(clones):
                assert shell(clone, f"echo clone=$(({index} * 7))", r"clone=(\d+)") == str(index * 7).encode()
            for clone in clones:
                assert guest_clock_error(clone) <= CLOCK_SLACK
            draw = "echo rnd=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n')"
            randomness = {shell(clone, draw, r"rnd=([0-9a-f]{32})") for clone in clones}
            assert len(randomness) == len(clones), "clones drew the same random bytes"
        finally:
            for clone in clones:
                clone.close()
        assert shell(parent, "echo parent=$((6*7))", r"parent=(\d+)") == b"42"


def test_forked_network_cards_go_down_or_onto_their_own_taps_with_new_macs(guest):
    """A clone with net="none" sees its carrier drop; one on a tap of its own, told its new MAC,
    reaches the host through that tap while the parent's tap has no address."""
    host_ip, guest_ip = "10.0.2.1", "10.0.2.15"
    with (
        network_namespace("kvmkit-forknet") as netns,
        kvmkit.VM(memory=MEMORY, cpus=1, irqchip=True, pit=True) as parent,
    ):
        in_netns(netns, lambda: parent.add_net("kparent0"))
        ip(netns, "link", "set", "kparent0", "up")
        console = parent.boot_linux(guest.vmlinux, initrd=guest.initrd, cmdline=guest.cmdline)
        parent.start()
        console.expect(READY_MARKER.encode(), timeout=BOOT_TIMEOUT)
        shell(parent, f"ip addr add {guest_ip}/24 dev eth0; ip link set eth0 up; echo up=$((2+3))", r"up=(5)")
        carrier = (
            "until [ $(cat /sys/class/net/eth0/carrier) = {0} ]; do sleep 0.1; done; echo carrier=$(({0}+10))"
        )
        assert shell(parent, carrier.format(1), r"carrier=(\d+)") == b"11"
        unplugged, plugged = clones = in_netns(
            netns, lambda: parent.fork(2, net=["none", "kclone0"], new_mac=True)
        )
        try:
            for clone in clones:
                clone.start()
            assert shell(unplugged, carrier.format(0), r"carrier=(\d+)") == b"10"
            assert unplugged.virtio_devices[0].tap is None
            card = plugged.virtio_devices[0]
            assert card.tap == "kclone0" and card.mac != parent.virtio_devices[0].mac
            ip(netns, "addr", "add", f"{host_ip}/24", "dev", "kclone0")
            ip(netns, "link", "set", "kclone0", "up")
            assert shell(plugged, carrier.format(1), r"carrier=(\d+)") == b"11"
            shell(
                plugged,
                f"ip link set dev eth0 address {card.mac}; echo mac=$(cat /sys/class/net/eth0/address)",
                rf"mac=({card.mac})",
            )
            assert shell(plugged, f"ping -c 3 -W 5 {host_ip} >/dev/null; echo ping=$?", r"ping=(\d+)") == b"0"
            assert card.mac in ip(netns, "neigh", "show", "dev", "kclone0")
        finally:
            for clone in clones:
                clone.close()
