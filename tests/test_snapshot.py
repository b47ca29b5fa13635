"""Pause, snapshot, in-place restore, files and fork, on small bare-metal guests."""

import json
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import kvmkit
import pytest
from kvmkit import ExitReason
from kvmkit.errors import (
    ConfigError,
    SnapshotError,
    SnapshotFormatError,
    SnapshotMismatchError,
    SnapshotVersionError,
    VmStateError,
)
from kvmkit.virtio import Net
from support import in_netns, ip, network_namespace

pytestmark = [pytest.mark.kvm, pytest.mark.standard_kvm]

LOAD_ADDR = 0x1000
PORT = 0xE9
COUNTER = 0x2000
PAGES = [0x10000 + i * 0x1000 for i in range(64)]
HANG_GUARD = 10.0


class Walker:
    """snapshot_walk.S in a VM: each run writes the next count to 64 pages, reports it on the
    port and halts."""

    def __init__(self, vm):
        self.vm = vm
        self.reported: list[int] = []
        vm.hook_io(PORT, 4, write=lambda port, data: self.reported.append(int.from_bytes(data, "little")))

    def step(self) -> int:
        exit = self.vm.run(timeout=HANG_GUARD)
        assert exit.reason == ExitReason.HLT, exit
        return self.reported[-1]

    def count_in_memory(self) -> int:
        return int.from_bytes(self.vm.mem_read(COUNTER, 4), "little")


@pytest.fixture
def walker(boot):
    return Walker(boot("snapshot_walk", "protected"))


def test_restore_puts_registers_and_memory_back_any_number_of_times(walker):
    vm = walker.vm
    assert [walker.step() for _ in range(3)] == [1, 2, 3]
    snap = vm.snapshot()
    regs = vm.vcpus[0].regs
    memory = vm.mem_read(0, 2 << 20)

    for _ in range(50):
        assert [walker.step() for _ in range(2)] == [4, 5]
        vm.restore(snap)
        assert vm.last_restore["pages_copied"] == 65  # the counter's page and the 64 the guest walks
        assert vm.vcpus[0].regs == regs
        assert walker.count_in_memory() == 3
    assert vm.mem_read(0, 2 << 20) == memory == snap.mem_read(0, 2 << 20)
    assert walker.step() == 4


def test_an_older_snapshot_comes_back_after_a_newer_one(walker):
    vm = walker.vm
    walker.step()
    first = vm.snapshot()
    walker.step()
    walker.step()
    second = vm.snapshot()
    walker.step()

    vm.restore(first)
    assert walker.count_in_memory() == 1
    assert walker.step() == 2
    vm.restore(second)
    assert walker.count_in_memory() == 3
    assert walker.step() == 4
    assert first.mem_read(COUNTER, 4) == (1).to_bytes(4, "little")


def test_writes_by_the_host_are_undone_too(walker):
    vm = walker.vm
    walker.step()
    snap = vm.snapshot()
    vm.mem_write(0x80000, b"host")
    view = vm.mem_view(0x90000, 16)
    view[:4] = b"view"
    vm.restore(snap)
    assert vm.mem_read(0x80000, 4) == bytes(4)
    assert vm.mem_read(0x90000, 4) == bytes(4)


def test_pause_completes_the_port_read_it_stopped_after(boot):
    """A run stopped right after its handler served an ``in`` has the value in EAX already and
    RIP past the instruction, so a snapshot taken then continues without reading the port again."""
    vm = boot("pio_read_loop", "protected", regs={"rdx": 0x60})
    reads = []

    def read(port, size):
        reads.append(port)
        if len(reads) == 5:
            vm.stop()
        return 0x1000 + len(reads)

    vm.hook_io(0x60, 4, read=read)
    exit = vm.run(timeout=HANG_GUARD)
    assert exit.reason == ExitReason.STOPPED
    regs = vm.vcpus[0].regs
    assert (regs.rax & 0xFFFF_FFFF, regs.rbx & 0xFFFF_FFFF, regs.rcx & 0xFFFF_FFFF) == (0x1005, 0x1004, 4)


def test_pause_and_resume_from_another_thread(boot):
    vm = boot("loop", "protected")
    vm.start()
    time.sleep(0.05)
    vm.pause()
    assert vm.paused and not vm.running
    assert vm.last_exit.reason == ExitReason.PAUSED
    rip = vm.vcpus[0].regs.rip
    time.sleep(0.05)
    assert vm.vcpus[0].regs.rip == rip, "a paused vCPU does not move"
    vm.resume()
    assert vm.running and not vm.paused
    vm.stop()
    vm.wait(timeout=HANG_GUARD)


def test_a_snapshot_of_a_running_vm_needs_it_paused(boot):
    vm = boot("loop", "protected")
    vm.start()
    with pytest.raises(VmStateError):
        vm.snapshot()
    vm.pause()
    snap = vm.snapshot()
    vm.resume()
    vm.pause()
    vm.restore(snap)
    assert vm.paused
    vm.close()


def test_saved_snapshots_continue_in_another_process(walker, tmp_path):
    vm = walker.vm
    walker.step()
    walker.step()
    vm.snapshot().save(tmp_path / "snap")
    assert {p.name for p in (tmp_path / "snap").iterdir()} == {"state", "memory"}

    script = textwrap.dedent(
        f"""
        import kvmkit
        vm = kvmkit.VM.from_snapshot({str(tmp_path / "snap")!r})
        seen = []
        vm.hook_io({PORT}, 4, write=lambda port, data: seen.append(int.from_bytes(data, "little")))
        for _ in range(3):
            assert vm.run(timeout={HANG_GUARD}).reason == kvmkit.ExitReason.HLT
        print(seen)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[3, 4, 5]"
    assert [walker.step() for _ in range(3)] == [3, 4, 5]


def test_a_snapshot_restores_into_a_vm_built_from_its_files(walker, tmp_path):
    vm = walker.vm
    walker.step()
    snap = vm.snapshot()
    snap.save(tmp_path / "snap")
    loaded = kvmkit.Snapshot.load(tmp_path / "snap")
    assert loaded.mem_read(0, 2 << 20) == snap.mem_read(0, 2 << 20)
    assert (loaded.cpus, loaded.memory_regions) == (1, [(0, 2 << 20)])
    walker.step()
    vm.restore(loaded)
    assert walker.count_in_memory() == 1
    assert walker.step() == 2


def _corrupt(path: Path, how: str) -> None:
    state = path / "state"
    data = state.read_bytes()
    if how == "truncated":
        state.write_bytes(data[: len(data) // 2])
    elif how == "flipped":
        state.write_bytes(data[:-10] + bytes([data[-10] ^ 0x20]) + data[-9:])
    elif how == "version":
        header, body = data.split(b"\n", 1)
        fields = header.split(b" ")
        fields[1] = b"99"
        state.write_bytes(b" ".join(fields) + b"\n" + body)
    elif how == "not_a_snapshot":
        state.write_text('{"hello": "world"}\n')
    elif how == "memory_size":
        with open(path / "memory", "r+b") as memory:
            memory.truncate(4096)


@pytest.mark.parametrize(
    "how, error, words",
    [
        ("truncated", SnapshotFormatError, "cut short"),
        ("flipped", SnapshotFormatError, "checksum"),
        ("version", SnapshotVersionError, "version 99"),
        ("not_a_snapshot", SnapshotFormatError, "not a kvmkit snapshot"),
        ("memory_size", SnapshotFormatError, "holds 4096 bytes"),
    ],
)
def test_damaged_snapshot_files_are_named_and_refused(walker, tmp_path, how, error, words):
    walker.vm.snapshot().save(tmp_path / "snap")
    _corrupt(tmp_path / "snap", how)
    with pytest.raises(error, match=words):
        kvmkit.VM.from_snapshot(tmp_path / "snap")


def test_missing_snapshots_and_mismatched_vms_are_refused(walker, make_vm, tmp_path):
    with pytest.raises(SnapshotError, match="cannot read snapshot state file"):
        kvmkit.Snapshot.load(tmp_path / "nothing")
    snap = walker.vm.snapshot()
    with pytest.raises(SnapshotMismatchError, match="vCPUs"):
        make_vm(cpus=2).restore(snap)
    with pytest.raises(SnapshotMismatchError, match="memory"):
        make_vm(memory="4M").restore(snap)


def test_forks_share_memory_and_go_their_own_ways(walker):
    vm = walker.vm
    walker.step()
    clones = vm.fork(3)
    assert isinstance(clones, list) and len(clones) == 3
    try:
        walkers = [Walker(clone) for clone in clones]
        for i, clone in enumerate(walkers):
            clone.vm.mem_write(0x2000, (100 * (i + 1)).to_bytes(4, "little"))
        assert [clone.step() for clone in walkers] == [101, 201, 301]
        assert walker.step() == 2
        assert [clone.step() for clone in walkers] == [102, 202, 302]
        assert [clone.vm.mem_read(PAGES[-1], 4) for clone in walkers] == [
            n.to_bytes(4, "little") for n in (102, 202, 302)
        ]
    finally:
        for clone in clones:
            clone.close()


def test_a_running_vm_forks_and_keeps_running(boot):
    vm = boot("loop", "protected")
    vm.start()
    clone = vm.fork()
    try:
        assert vm.running and not clone.running
        assert clone.run(timeout=0.1).reason == ExitReason.TIMEOUT
    finally:
        clone.close()
        vm.stop()
        vm.wait(timeout=HANG_GUARD)


def test_devices_that_cannot_be_shared_refuse_a_fork(make_vm, tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4096))
    vm = make_vm()
    vm.add_disk(image)
    with pytest.raises(ConfigError, match="writable disk"):
        vm.fork()
    with pytest.raises(ConfigError, match="refuse"):
        vm.fork(disks="share")


def test_many_restores_from_several_threads_leave_vms_intact(boot):
    """Snapshots and restores of several VMs at once do not interfere."""
    vms = [Walker(boot("snapshot_walk", "protected")) for _ in range(3)]
    errors = []

    def churn(walker):
        try:
            walker.step()
            snap = walker.vm.snapshot()
            for _ in range(30):
                assert walker.step() == 2
                walker.vm.restore(snap)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=churn, args=(w,)) for w in vms]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


def test_the_state_file_is_readable_json_after_its_header(walker, tmp_path):
    walker.vm.snapshot().save(tmp_path / "snap")
    header, body = (tmp_path / "snap" / "state").read_bytes().split(b"\n", 1)
    assert header.split(b" ")[:2] == [b"kvmkit-snapshot", b"1"]
    state = json.loads(body)
    assert state["machine"]["config"]["vcpus"] == 1
    assert state["memory"]["regions"] == [[0, 2 << 20]]
    assert state["embedder"]["devices"] == []


GOLDEN = Path(__file__).parent / "snapshots"


def test_golden_snapshots_still_load_and_run(assemble):
    """tests/snapshots/walker-v1 was saved by format version 1 from snapshot_walk.S after two
    steps (on a paravirtualized KVM host); a change to the format that breaks reading it fails
    here. It must also restore and run on every host the suite runs on."""
    snap = kvmkit.Snapshot.load(GOLDEN / "walker-v1")
    assert (snap.cpus, snap.memory_regions) == (1, [(0, 2 << 20)])
    code = assemble("snapshot_walk")
    assert snap.mem_read(LOAD_ADDR, len(code)) == code
    assert snap.mem_read(COUNTER, 4) == (2).to_bytes(4, "little")
    vm = kvmkit.VM.from_snapshot(snap)
    try:
        walker = Walker(vm)
        assert [walker.step() for _ in range(2)] == [3, 4]
    finally:
        vm.close()


def test_each_fork_gets_its_own_vsock_socket(make_vm, tmp_path):
    vm = make_vm()
    vm.add_vsock(3, tmp_path / "vsock.sock")
    clones = vm.fork(2)
    try:
        paths = [clone.virtio_devices[0].uds_path for clone in clones]
        assert len(set(paths)) == 2
        for path in paths:
            assert path.startswith(str(tmp_path / "vsock.sock.fork"))
            assert Path(path).is_socket()
        assert [clone.virtio_devices[0].cid for clone in clones] == [3, 3]
    finally:
        for clone in clones:
            clone.close()


# --------------------------------------------------------------------------- network cards in forks

NET_PARAMS = 0x9_0000  # tests/guests/virtio_net.c's parameters, as test_virtio_net passes them
HOST_IP = "10.0.2.1"


@pytest.fixture
def netns():
    """A fresh network namespace, deleted at teardown with the taps left in it."""
    with network_namespace("kvmkit-fork") as name:
        yield name


def vm_with_card(make_vm, netns, tap="kparent0", mac="52:54:00:4b:56:4d"):
    vm = make_vm()
    in_netns(netns, lambda: vm.add_net(tap, mac=mac))
    return vm


def tap_up(netns, tap):
    """Addresses `tap` as the guest's host and brings it up; returns its own MAC."""
    ip(netns, "addr", "add", f"{HOST_IP}/24", "dev", tap)
    ip(netns, "link", "set", tap, "up")
    (link,) = json.loads(ip(netns, "-j", "link", "show", tap))
    return link["address"]


def run_net_guest(vm, run_c_guest):
    """tests/guests/virtio_net.c on the VM's first card: its exit code and what it printed."""
    vm.mem_write(NET_PARAMS, struct.pack("<QI", vm.virtio_devices[0].address, 0))
    return run_c_guest(vm, "virtio_net", arg=NET_PARAMS)


def close_all(vms):
    for vm in vms:
        vm.close()


def test_a_vm_with_a_network_card_forks_onto_cards_with_the_link_down(make_vm, run_c_guest, netns):
    vm = vm_with_card(make_vm, netns)
    (parent,) = vm.virtio_devices
    clones = vm.fork(2)
    try:
        for clone in clones:
            (card,) = clone.virtio_devices
            assert isinstance(card, Net)
            assert (card.address, card.irq, card.mac) == (parent.address, parent.irq, parent.mac)
            assert card.tap is None

            code, text = run_net_guest(clone, run_c_guest)

            # The driver found the card, read the link down from its status, and sent an ARP
            # request, which came back used and unsent.
            assert (code, text) == (0, f"mac={parent.mac}\nlink=down\n")
            stats = card.stats
            assert (stats.requests, stats.errors) == (1, 1)
            assert stats.bytes_from_guest == stats.bytes_to_guest == 0
        assert parent.stats.requests == 0
    finally:
        close_all(clones)


def test_forks_go_onto_taps_of_their_own(make_vm, run_c_guest, netns):
    vm = vm_with_card(make_vm, netns)
    (parent,) = vm.virtio_devices
    clones = in_netns(netns, lambda: vm.fork(2, net=["kclone0", "kclone1"]))
    try:
        cards = [clone.virtio_devices[0] for clone in clones]
        assert [card.tap for card in cards] == ["kclone0", "kclone1"]
        assert {(card.address, card.mac) for card in cards} == {(parent.address, parent.mac)}
        # Only the second clone's tap is up and answers: the guest's frames went out of it.
        tap_mac = tap_up(netns, "kclone1")

        code, text = run_net_guest(clones[1], run_c_guest)

        assert code == 0, text
        assert text == f"mac={parent.mac}\nlink=up\narp {HOST_IP} is-at {tap_mac}\npong seq=1 ttl=64\n"
        assert cards[1].stats.bytes_from_guest > 0
        assert cards[0].stats.requests == parent.stats.requests == 0
    finally:
        close_all(clones)


def test_forks_get_numbered_taps_and_new_macs(make_vm, run_c_guest, netns):
    vm = vm_with_card(make_vm, netns)
    (parent,) = vm.virtio_devices
    clones = in_netns(netns, lambda: vm.fork(2, net="kfork%d", new_mac=True))
    try:
        cards = [clone.virtio_devices[0] for clone in clones]
        assert [card.tap for card in cards] == ["kfork0", "kfork1"]
        macs = {parent.mac, *(card.mac for card in cards)}
        assert len(macs) == 3
        for card in cards:
            assert int(card.mac.split(":")[0], 16) & 0b11 == 0b10, f"{card.mac} is not locally administered"
        tap_mac = tap_up(netns, "kfork0")

        code, text = run_net_guest(clones[0], run_c_guest)

        # The driver read the new MAC from the configuration space, and the host answered it.
        assert code == 0, text
        assert text == f"mac={cards[0].mac}\nlink=up\narp {HOST_IP} is-at {tap_mac}\npong seq=1 ttl=64\n"
    finally:
        close_all(clones)


@pytest.mark.parametrize(
    ("net", "words"),
    [
        (["kone0"], "1 taps for 2 clone"),
        (["kone0", "ktwo0", "kthree0"], "3 taps for 2 clone"),
        ("kshared0", "cannot share the tap kshared0"),
        ([["ka0", "kb0"], ["kc0", "kd0"]], "1 network card"),
        (42, "net must be"),
    ],
    ids=["too-few", "too-many", "one-for-all", "two-per-card", "not-a-name"],
)
def test_a_wrong_number_of_taps_refuses_the_fork(make_vm, netns, net, words):
    vm = vm_with_card(make_vm, netns)

    with pytest.raises(ConfigError, match=words):
        in_netns(netns, lambda: vm.fork(2, net=net))

    assert "kone0" not in ip(netns, "link", "show")


def test_a_snapshot_with_a_network_card_comes_back_without_its_tap_or_on_another(make_vm, netns, tmp_path):
    vm = vm_with_card(make_vm, netns)
    (parent,) = vm.virtio_devices
    vm.snapshot().save(tmp_path / "snap")
    unplugged = kvmkit.VM.from_snapshot(tmp_path / "snap", net="none")
    elsewhere = in_netns(netns, lambda: kvmkit.VM.from_snapshot(tmp_path / "snap", net=["kother0"]))
    try:
        for restored, tap in ((unplugged, None), (elsewhere, "kother0")):
            (card,) = restored.virtio_devices
            assert (card.address, card.tap, card.mac) == (parent.address, tap, parent.mac)
        # A snapshot of the card without a tap brings it back without one.
        unplugged.snapshot().save(tmp_path / "again")
        again = kvmkit.VM.from_snapshot(tmp_path / "again")
        assert [d.tap for d in again.virtio_devices] == [None]
        again.close()
    finally:
        close_all([unplugged, elsewhere])
