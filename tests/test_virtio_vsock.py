"""virtio-vsock between a bare-metal guest (tests/guests/virtio_vsock.c) and Python sockets on
the host: connections both ways, refusals both ways, and the credit the guest grants."""

from __future__ import annotations

import re
import socket
import struct
import threading
from typing import Callable, Generic, TypeVar

import pytest
from kvmkit.errors import DeviceError

pytestmark = pytest.mark.kvm

T = TypeVar("T")

CID = 42
PARAMS = 0x9_0000  # between the C guests' stack top and their image
CONNECT, LISTEN = 1, 2  # the guest's modes
HOST_TIMEOUT = 5.0  # every blocking host-side socket call
MESSAGE = bytes(range(32, 232))  # what the host sends to the guest listener


class Background(Generic[T]):
    """fn() on a thread; result() waits for it and returns its value or raises its exception."""

    def __init__(self, fn: Callable[[], T]) -> None:
        self._outcome: dict[str, object] = {}
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], T]) -> None:
        try:
            self._outcome["value"] = fn()
        except BaseException as error:
            self._outcome["error"] = error

    def result(self) -> T:
        self._thread.join(2 * HOST_TIMEOUT)
        assert not self._thread.is_alive(), "the host side hangs"
        if "error" in self._outcome:
            raise self._outcome["error"]  # type: ignore[misc]
        return self._outcome["value"]  # type: ignore[return-value]


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError(f"the stream ended after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


def recv_until_eof(sock: socket.socket) -> bytes:
    data = bytearray()
    while chunk := sock.recv(4096):
        data += chunk
    return bytes(data)


def guest_params(vsock, mode: int, port: int, *, buf_alloc=4096, max_refusals=0, data=b"") -> bytes:
    return struct.pack("<QIIIII", vsock.address, mode, port, buf_alloc, max_refusals, len(data)) + data


@pytest.fixture
def vsock_vm(make_vm, tmp_path):
    """A VM with a vsock device for CID 42 on a socket in tmp_path."""
    vm = make_vm()
    return vm, vm.add_vsock(CID, tmp_path / "vsock")


def test_guest_connects_to_a_host_listener(vsock_vm, run_c_guest):
    vm, vsock = vsock_vm
    message = b"hello from the guest"

    with vsock.listen(1234) as listener:
        listener.settimeout(HOST_TIMEOUT)

        def serve() -> tuple[bytes, bytes]:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(HOST_TIMEOUT)
                got = recv_exactly(conn, len(message))
                conn.sendall(got.upper())
                return got, recv_until_eof(conn)

        host = Background(serve)
        vm.mem_write(PARAMS, guest_params(vsock, CONNECT, 1234, data=message))
        code, text = run_c_guest(vm, "virtio_vsock", arg=PARAMS)
        got, after = host.result()

    assert code == 0, text
    # The guest's bytes reached the listener whole; the answer came back, its header saying the
    # device had passed all of the guest's bytes on (fwd_cnt); the guest's SHUTDOWN ended the
    # host's stream (EOF) and the device confirmed with a RST.
    assert got == message
    assert after == b""
    assert text == f"cid={CID}\nfwd_cnt={len(message)}\nreply=HELLO FROM THE GUEST\n"
    stats = vsock.stats
    assert stats.errors == 0
    assert stats.bytes_from_guest >= len(message)
    assert stats.bytes_to_guest >= len(message)


def test_guest_connection_to_a_port_nobody_listens_on_is_reset(vsock_vm, run_c_guest):
    vm, vsock = vsock_vm

    with vsock.listen(1234):  # another port
        vm.mem_write(PARAMS, guest_params(vsock, CONNECT, 1235, data=b"x"))
        code, text = run_c_guest(vm, "virtio_vsock", arg=PARAMS)

    assert (code, text) == (1, f"cid={CID}\nrst\n")
    assert vsock.stats.errors == 0


def host_initiated_exchange(vm, vsock, run_c_guest, client: Callable[[], T]) -> tuple[T, int, int]:
    """Runs `client` against the guest listening on port 52 with 64 bytes of credit (so that the
    device has to wait for its credit updates); returns what the client returned, the port the
    guest saw the connection come from and how many RW packets it took to deliver MESSAGE."""
    host = Background(client)
    vm.mem_write(PARAMS, guest_params(vsock, LISTEN, 52, buf_alloc=64))
    code, text = run_c_guest(vm, "virtio_vsock", arg=PARAMS)
    answer = host.result()
    assert code == 0, text
    pattern = rf"cid={CID}\naccepted from port (\d+)\nreceived {len(MESSAGE)} bytes in (\d+) packets\n"
    match = re.fullmatch(pattern, text)
    assert match, text
    return answer, int(match[1]), int(match[2])


def test_host_connects_to_a_guest_listener(vsock_vm, run_c_guest):
    vm, vsock = vsock_vm

    def client() -> bytes:
        with vsock.connect(52, timeout=HOST_TIMEOUT) as sock:
            sock.settimeout(HOST_TIMEOUT)
            sock.sendall(MESSAGE)
            sock.shutdown(socket.SHUT_WR)
            return recv_until_eof(sock)

    reply, _port, packets = host_initiated_exchange(vm, vsock, run_c_guest, client)

    # Whole and in order (the guest sent it back reversed), never more than 64 bytes in flight.
    assert reply == MESSAGE[::-1]
    assert packets >= len(MESSAGE) // 64 + 1, "the device sent more than the guest's credit"
    assert vsock.stats.errors == 0


def test_data_sent_with_the_connect_line_waits_for_the_guest(vsock_vm, run_c_guest):
    vm, vsock = vsock_vm

    def client() -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(HOST_TIMEOUT)
            sock.connect(vsock.uds_path)
            sock.sendall(b"CONNECT 52\n" + MESSAGE)  # before the guest even accepted
            sock.shutdown(socket.SHUT_WR)
            return recv_until_eof(sock)

    answer, port, _packets = host_initiated_exchange(vm, vsock, run_c_guest, client)

    # The device's answer names the port the guest saw; the data after the line reached the guest.
    assert answer == f"OK {port}\n".encode() + MESSAGE[::-1]
    assert vsock.stats.errors == 0


def test_a_port_the_guest_refuses_raises_connection_refused(vsock_vm, run_c_guest):
    vm, vsock = vsock_vm

    def client() -> socket.socket:
        return vsock.connect(53, timeout=HOST_TIMEOUT)

    host = Background(client)
    vm.mem_write(PARAMS, guest_params(vsock, LISTEN, 52, max_refusals=1))
    code, text = run_c_guest(vm, "virtio_vsock", arg=PARAMS)

    assert (code, text) == (2, f"cid={CID}\nrefused 53\n")
    with pytest.raises(ConnectionRefusedError, match="refused vsock port 53"):
        host.result()


def test_connect_times_out_while_no_driver_answers(vsock_vm):
    _vm, vsock = vsock_vm  # never started: nothing answers the device's REQUEST

    with pytest.raises(TimeoutError):
        vsock.connect(52, timeout=0.3)


@pytest.mark.parametrize("cid", [0, 1, 2, 0xFFFF_FFFF, 1 << 32])
def test_a_reserved_cid_raises_device_error(make_vm, tmp_path, cid):
    vm = make_vm()

    with pytest.raises(DeviceError, match="reserved or out of range"):
        vm.add_vsock(cid, tmp_path / "vsock")

    assert not (tmp_path / "vsock").exists()
    assert vm.virtio_devices == []


def test_a_socket_path_in_use_raises_device_error(make_vm, tmp_path):
    vm = make_vm()
    vm.add_vsock(CID, tmp_path / "vsock")

    with pytest.raises(DeviceError, match="already exists"):
        vm.add_vsock(CID + 1, tmp_path / "vsock")
    with pytest.raises(DeviceError, match="does not exist"):
        vm.add_vsock(CID + 1, tmp_path / "missing" / "vsock")

    assert len(vm.virtio_devices) == 1
