"""virtio-net on a real tap: a bare-metal guest (tests/guests/virtio_net.c) talks ARP and ICMP
with the Linux kernel through the device. Each test gets a network namespace of its own, so the
host's interfaces are never touched."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator

import kvmkit
import pytest
from kvmkit.errors import ConfigError, DeviceError
from kvmkit.virtio import Net
from support import in_netns, ip, network_namespace

pytestmark = pytest.mark.kvm


PARAMS = 0x9_0000  # between the C guests' stack top and their image
TAP = "ktap0"
HOST_IP = "10.0.2.1"
GUEST_MAC = "52:54:00:4b:56:4d"
NET_HDR_LEN = 12
ARP_FRAME, PING_FRAME = 42, 74  # the guest's two good frames, without their virtio-net header


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh network namespace, deleted at teardown with whatever taps are left in it."""
    with network_namespace("kvmkit-test") as name:
        yield name


def attach_tap(vm: kvmkit.VM, netns: str, mac: str | None = GUEST_MAC) -> tuple[Net, str]:
    """A card on a new tap in `netns` addressed 10.0.2.1/24 and up; also the tap's own MAC."""
    net = in_netns(netns, lambda: vm.add_net(TAP, mac=mac))
    ip(netns, "addr", "add", f"{HOST_IP}/24", "dev", TAP)
    ip(netns, "link", "set", TAP, "up")
    (link,) = json.loads(ip(netns, "-j", "link", "show", TAP))
    return net, link["address"]


def run_net_guest(vm, run_c_guest, net, *, bad_tx: bool) -> tuple[int, str]:
    vm.mem_write(PARAMS, struct.pack("<QI", net.address, int(bad_tx)))
    return run_c_guest(vm, "virtio_net", arg=PARAMS)


def expected_text(tap_mac: str) -> str:
    # Linux answers pings with its default TTL of 64.
    return f"mac={GUEST_MAC}\nlink=up\narp {HOST_IP} is-at {tap_mac}\npong seq=1 ttl=64\n"


def test_guest_resolves_and_pings_the_host_through_the_tap(make_vm, run_c_guest, netns):
    vm = make_vm()
    net, tap_mac = attach_tap(vm, netns)
    assert (net.kind, net.tap, net.mac) == ("net", TAP, GUEST_MAC)

    code, text = run_net_guest(vm, run_c_guest, net, bad_tx=False)

    assert code == 0, text
    # The guest read its MAC from the config space, and the kernel's ARP and echo replies came
    # from the tap's MAC to it.
    assert text == expected_text(tap_mac)
    stats = net.stats
    assert stats.errors == 0
    assert stats.bytes_from_guest == 2 * NET_HDR_LEN + ARP_FRAME + PING_FRAME
    # the two replies at least; the kernel may have sent IPv6 chatter too
    assert stats.bytes_to_guest >= 2 * NET_HDR_LEN + ARP_FRAME + PING_FRAME
    assert stats.requests >= 4  # two frames each way


def test_bad_transmit_chains_are_dropped_and_counted(make_vm, run_c_guest, netns):
    vm = make_vm()
    net, tap_mac = attach_tap(vm, netns)

    code, text = run_net_guest(vm, run_c_guest, net, bad_tx=True)

    # Both bad chains came back used and empty; the frames after them still reached the kernel.
    assert code == 0, text
    assert text == expected_text(tap_mac)
    stats = net.stats
    assert stats.errors == 2
    assert stats.bytes_from_guest == 2 * NET_HDR_LEN + ARP_FRAME + PING_FRAME
    assert stats.requests >= 6


@pytest.mark.parametrize(
    ("tap", "reason"),
    [
        ("", "it is empty"),
        ("a-very-long-tap-name", "longer than 15 bytes"),
        ("tap/0", "contains '/'"),
        ("tap 0", "whitespace"),
        ("lo", "not a single-queue tap"),
    ],
    ids=["empty", "too-long", "slash", "space", "loopback"],
)
def test_a_tap_that_cannot_be_used_raises_device_error(make_vm, netns, tap, reason):
    vm = make_vm()

    with pytest.raises(DeviceError, match=reason):
        in_netns(netns, lambda: vm.add_net(tap))

    assert vm.virtio_devices == []


@pytest.mark.parametrize(
    "mac",
    [
        "",
        "52:54:00:12:34",
        "52:54:00:12:34:56:78",
        "52-54-00-12-34-56",
        "52:54:00:12:34:5g",
        "5:54:00:12:34:56",
    ],
)
def test_a_malformed_mac_raises_config_error(make_vm, netns, mac):
    vm = make_vm()

    with pytest.raises(ConfigError, match="not a MAC address") as raised:
        in_netns(netns, lambda: vm.add_net(TAP, mac=mac))

    # a bad value, not a device that failed to open
    assert not isinstance(raised.value, DeviceError)
    assert vm.virtio_devices == []
    assert TAP not in ip(netns, "link", "show")


def test_a_multicast_mac_raises_config_error(make_vm, netns):
    vm = make_vm()

    with pytest.raises(ConfigError, match="multicast"):
        in_netns(netns, lambda: vm.add_net(TAP, mac="01:00:5e:00:00:01"))


def test_taps_are_numbered_and_macs_generated(make_vm, netns):
    vm = make_vm()

    first, second = in_netns(
        netns, lambda: (vm.add_net("kvmkit%d"), vm.add_net("kvmkit%d", mac="02:AB:cd:00:00:01"))
    )

    assert (first.tap, second.tap) == ("kvmkit0", "kvmkit1")
    assert second.mac == "02:ab:cd:00:00:01"
    octets = [int(part, 16) for part in first.mac.split(":")]
    assert len(octets) == 6
    assert octets[0] & 0b11 == 0b10, f"{first.mac} is not a locally administered unicast address"
    assert vm.virtio_devices == [first, second]
    assert first.address != second.address and first.irq != second.irq
