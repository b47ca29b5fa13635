"""The guest agent without a guest: its C program (``kvmkit-agent --unix PATH``) on the host,
served to :class:`kvmkit.agent.Agent` through a Unix socket; the reply parser and the request
encoders on their own; raw malformed requests; connection retries; the image recipe.

``tests/test_agent.py`` runs the same agent in the default guest, over vsock.
"""

from __future__ import annotations

import errno
import os
import random
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import kvmkit
import pytest
from kvmkit import images
from kvmkit.agent import (
    MAGIC,
    Agent,
    ExecResult,
    Frame,
    How,
    Op,
    encode_exec,
    encode_get,
    encode_put,
    parse_reply,
)
from kvmkit.errors import (
    AgentError,
    AgentTimeout,
    CommandFailed,
    ConfigError,
    GuestOSError,
    ImageError,
    KvmkitError,
)


class UnixConnector:
    """Stands in for a Vsock device: connects straight to the agent's Unix socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.attempts = 0

    def connect(self, port: int, timeout: float | None = 10.0) -> socket.socket:
        self.attempts += 1
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(str(self.path))
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        return sock


@pytest.fixture(scope="module")
def agent_binary(tmp_path_factory) -> Path:
    binary = tmp_path_factory.mktemp("agent") / "kvmkit-agent"
    images.build_agent(binary)
    return binary


@pytest.fixture(scope="module")
def socket_path(agent_binary, tmp_path_factory):
    path = tmp_path_factory.mktemp("sock") / "agent.sock"
    process = subprocess.Popen([agent_binary, "--unix", path], stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not path.exists():
            assert process.poll() is None, "the agent exited at start"
            assert time.monotonic() < deadline, "the agent did not listen"
            time.sleep(0.01)
        yield path
        assert process.poll() is None, "the agent died during the tests"
    finally:
        process.kill()
        process.wait()


@pytest.fixture
def agent(socket_path) -> Agent:
    return Agent(UnixConnector(socket_path), connect_timeout=5)


def raw_request(socket_path: Path, request: bytes, *, linger: float = 10.0) -> bytes:
    """Sends ``request`` as it is, ends the sending side, and returns all the agent sends back
    until it closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(linger)
        sock.connect(str(socket_path))
        try:
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the agent may close before taking all of a bad request
        reply = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            reply += chunk
        return reply


def frames(reply: bytes) -> list[tuple[int, bytes]]:
    out = []
    while reply:
        kind, length = struct.unpack_from("<II", reply)
        out.append((kind, reply[8 : 8 + length]))
        reply = reply[8 + length :]
    return out


def gone(pid: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


# --------------------------------------------------------------------------- commands


def test_shell_string_and_argv(agent):
    assert agent.exec("echo $((6 * 7))") == ExecResult(b"42\n", b"", 0)
    assert agent.exec(["echo", "$((6 * 7))"]).stdout == b"$((6 * 7))\n"
    assert agent.exec(["sh", "-c", 'printf "%s|" "$0" "$1"', "zero", "one two"]).stdout == b"zero|one two|"


def test_stdout_stderr_and_status_are_separate(agent):
    assert agent.exec("echo out; echo err >&2; exit 7") == ExecResult(b"out\n", b"err\n", 7)


def test_a_signal_is_a_negative_status(agent):
    assert agent.exec("kill -TERM $$").status == -15


def test_stdin_is_streamed_both_ways(agent):
    data = random.Random(1).randbytes(3 << 20)
    result = agent.exec(["cat"], input=data)
    assert result.stdout == data
    assert agent.exec("wc -c", input="é" * 10).stdout.strip() == b"20"
    assert agent.exec("cat").stdout == b"", "no input: the command sees the end of stdin at once"


def test_a_command_that_ignores_its_stdin_still_finishes(agent):
    big = bytes(4 << 20)
    assert agent.exec("head -c 3 >/dev/null; echo read", input=big).stdout == b"read\n"
    assert agent.exec("exec <&-; echo closed", input=big).stdout == b"closed\n"


def test_a_missing_program_is_a_guest_os_error(agent):
    with pytest.raises(GuestOSError, match="cannot run /no/such/program") as caught:
        agent.exec(["/no/such/program"])
    assert caught.value.errno == errno.ENOENT
    assert isinstance(caught.value, OSError) and isinstance(caught.value, AgentError)
    assert agent.exec("/no/such/program").status == 127, "through the shell it is the shell's status"


def test_check_raises_command_failed_with_the_result(agent):
    with pytest.raises(CommandFailed, match="exited with status 3: bad") as caught:
        agent.exec("echo some; echo bad >&2; exit 3", check=True)
    assert caught.value.result == ExecResult(b"some\n", b"bad\n", 3)
    assert agent.exec("true", check=True).status == 0


def test_a_timeout_kills_the_process_group_and_keeps_the_output(agent, tmp_path):
    pid_file = tmp_path / "pid"
    started = time.monotonic()
    with pytest.raises(AgentTimeout, match=r"did not end within 0\.5 s") as caught:
        agent.exec(f"echo started; sleep 60 & echo $! > {pid_file}; wait", timeout=0.5)
    assert time.monotonic() - started < 5
    assert isinstance(caught.value, TimeoutError)
    assert caught.value.stdout == b"started\n"
    assert gone(int(pid_file.read_text())), "the background sleep survived the timeout"
    assert agent.exec("echo next").stdout == b"next\n"


def test_a_hung_command_does_not_block_others(agent, tmp_path):
    results: list[ExecResult] = []
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    slow = threading.Thread(target=lambda: results.append(agent.exec(f"cat {fifo}")))
    slow.start()
    try:
        for _ in range(3):
            assert agent.exec("echo quick", timeout=5).stdout == b"quick\n"
        assert slow.is_alive()
    finally:
        with open(fifo, "wb") as writer:
            writer.write(b"released")
        slow.join(timeout=10)
    assert results == [ExecResult(b"released", b"", 0)]


def test_a_client_that_leaves_gets_its_command_killed(socket_path, tmp_path):
    pid_file = tmp_path / "pid"
    argv = [b"sh", b"-c", f"echo $$ > {pid_file}; exec sleep 60".encode()]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(socket_path))
        sock.sendall(encode_exec(argv, shell=False, stdin_len=0, timeout_ms=0))
        deadline = time.monotonic() + 10
        while not pid_file.exists() or not pid_file.read_text().strip():
            assert time.monotonic() < deadline
            time.sleep(0.02)
    assert gone(int(pid_file.read_text())), "the command outlived its connection"


# --------------------------------------------------------------------------- files


def test_put_and_get_round_trip_binary_data_and_mode(agent, tmp_path):
    data = os.urandom(1 << 20)
    target = tmp_path / "blob"
    agent.put_file(target, data, 0o600)
    assert target.read_bytes() == data
    assert target.stat().st_mode & 0o7777 == 0o600
    assert agent.get_file(target) == data
    agent.put_file(str(target), b"short", mode=0o755)
    assert target.read_bytes() == b"short", "put_file truncates"
    assert target.stat().st_mode & 0o7777 == 0o755, "and sets the mode of an existing file"
    agent.put_file(target, "")
    assert agent.get_file(target) == b""


def test_file_errors_carry_the_errno(agent, tmp_path):
    with pytest.raises(GuestOSError, match="No such file or directory") as caught:
        agent.get_file(tmp_path / "missing")
    assert caught.value.errno == errno.ENOENT
    with pytest.raises(GuestOSError) as caught:
        agent.get_file(tmp_path)
    assert caught.value.errno == errno.EISDIR
    with pytest.raises(GuestOSError) as caught:
        agent.put_file(tmp_path / "no" / "dir", b"x" * 300_000)
    assert caught.value.errno == errno.ENOENT
    assert agent.exec("echo still-serving").stdout == b"still-serving\n"


def test_bad_arguments_are_config_errors(agent):
    for call in (
        lambda: agent.exec([]),
        lambda: agent.exec(["echo", "a\0b"]),
        lambda: agent.exec(b"echo"),  # type: ignore[arg-type]
        lambda: agent.exec("true", timeout=0),
        lambda: agent.put_file("/tmp/x", b"", mode=0o10000),
        lambda: agent.get_file(""),
        lambda: agent.get_file("x" * 5000),
    ):
        with pytest.raises(ConfigError):
            call()


# --------------------------------------------------------------------------- malformed requests


def exec_request(argv: list[bytes], stdin: bytes = b"") -> bytes:
    return encode_exec(argv, shell=False, stdin_len=len(stdin), timeout_ms=0) + stdin


@pytest.mark.parametrize(
    ("request_bytes", "complaint"),
    [
        (b"HTTP/1.1 GET /\r\n\r\n", b"bad magic"),
        (MAGIC + struct.pack("<I", 99), b"unknown operation 99"),
        (MAGIC + struct.pack("<IIII", Op.EXEC, 0, 0, 0), b"0 arguments"),
        (MAGIC + struct.pack("<IIII", Op.EXEC, 0x80, 0, 1), b"unknown exec flags"),
        (MAGIC + struct.pack("<IIII", Op.EXEC, 1, 0, 2), b"a shell command is one string"),
        (MAGIC + struct.pack("<IIIII", Op.EXEC, 0, 0, 1, 0xFFFFFFFF), b"more than"),
        (MAGIC + struct.pack("<IIIII", Op.EXEC, 0, 0, 1, 3) + b"a\0b", b"NUL"),
        (MAGIC + struct.pack("<III", Op.PUT, 0o170000, 1) + b"x", b"beyond 07777"),
        (MAGIC + struct.pack("<II", Op.GET, 5000), b"more than 4096"),
        (MAGIC + struct.pack("<II", Op.GET, 10) + b"short", b"the request ends"),
        (exec_request([b"true"]) + b"extra", b"after the end of the request"),
    ],
)
def test_a_malformed_request_gets_fail_and_the_agent_serves_on(socket_path, agent, request_bytes, complaint):
    reply = raw_request(socket_path, request_bytes)
    (kind, payload), *_ = frames(reply)
    if complaint == b"after the end of the request":
        assert (kind, payload[:4]) == (Frame.FAIL, bytes(4)) or kind == Frame.EXIT
    else:
        assert kind == Frame.FAIL and len(frames(reply)) == 1
        assert payload[:4] == bytes(4), "errno 0: a malformed request"
        assert complaint in payload
    assert agent.exec("echo alive").stdout == b"alive\n"


def test_random_garbage_never_brings_the_agent_down(socket_path, agent):
    rng = random.Random(7)
    starts = [b"", MAGIC, MAGIC + struct.pack("<I", Op.EXEC), MAGIC + struct.pack("<I", Op.GET)]
    for _ in range(60):
        request = rng.choice(starts) + rng.randbytes(rng.randrange(40))
        reply = raw_request(socket_path, request, linger=2.0)
        for kind, _payload in frames(reply):
            assert kind in set(Frame)
    assert agent.exec("echo alive").stdout == b"alive\n"


# --------------------------------------------------------------------------- the client alone


def test_requests_are_laid_out_as_documented():
    assert encode_exec([b"ls", b"-l"], shell=False, stdin_len=3, timeout_ms=1500) == (
        b"KVA1" + struct.pack("<IIII", 1, 0, 1500, 2) + b"\x02\0\0\0ls\x02\0\0\0-l" + b"\x03\0\0\0"
    )
    assert encode_exec([b"echo hi"], shell=True, stdin_len=0, timeout_ms=0)[8:12] == b"\x01\0\0\0"
    assert encode_put(b"/f", 0o644, 9) == b"KVA1" + struct.pack("<II", 2, 0o644) + b"\x02\0\0\0/f\x09\0\0\0"
    assert encode_get(b"/f") == b"KVA1\x03\0\0\0\x02\0\0\0/f"


def frame(kind: int, payload: bytes) -> bytes:
    return struct.pack("<II", kind, len(payload)) + payload


def test_a_well_formed_reply_is_parsed():
    data = frame(Frame.STDOUT, b"ab") + frame(Frame.STDERR, b"e") + frame(Frame.STDOUT, b"c")
    reply = parse_reply(Op.EXEC, data + frame(Frame.EXIT, struct.pack("<II", How.SIGNALED, 9)))
    assert (bytes(reply.stdout), bytes(reply.stderr)) == (b"abc", b"e")
    assert (reply.how, reply.code) == (How.SIGNALED, 9)
    reply = parse_reply(Op.GET, frame(Frame.DATA, b"x" * 65536) + frame(Frame.DONE, b""))
    assert bytes(reply.data) == b"x" * 65536


def test_a_reply_fed_a_byte_at_a_time_is_the_same():
    data = frame(Frame.DATA, b"hello") + frame(Frame.DATA, b"!") + frame(Frame.DONE, b"")
    from kvmkit.agent import Reply

    reply = Reply(Op.GET)
    for byte in data:
        assert not reply.done
        reply.feed(bytes([byte]))
    assert reply.done and bytes(reply.data) == b"hello!"


@pytest.mark.parametrize(
    ("op", "data", "complaint"),
    [
        (Op.EXEC, frame(9, b""), "unknown frame kind 9"),
        (Op.EXEC, frame(Frame.DATA, b"x"), "a DATA frame in the reply to EXEC"),
        (Op.PUT, frame(Frame.STDOUT, b"x"), "a STDOUT frame in the reply to PUT"),
        (Op.GET, frame(Frame.DATA, b"x" * 65537), "a DATA frame of 65537 bytes"),
        (Op.GET, frame(Frame.DATA, b""), "a DATA frame of 0 bytes"),
        (Op.EXEC, frame(Frame.EXIT, b"\0" * 4), "an? EXIT frame of 4 bytes"),
        (Op.EXEC, frame(Frame.EXIT, struct.pack("<II", 7, 0)), "unknown exit kind 7"),
        (Op.PUT, frame(Frame.DONE, b"x"), "a DONE frame of 1 bytes"),
        (Op.GET, frame(Frame.FAIL, b"\0\0"), "a FAIL frame of 2 bytes"),
        (Op.GET, frame(Frame.DONE, b"") + b"\0", "after the end"),
        (Op.EXEC, frame(Frame.STDOUT, b"partial"), "closed the connection before the end"),
        (Op.EXEC, frame(Frame.STDOUT, b"partial")[:-2], "in the middle of a frame"),
        (Op.GET, b"", "closed the connection before the end"),
    ],
)
def test_a_malformed_reply_is_an_agent_error(op, data, complaint):
    with pytest.raises(AgentError, match=complaint):
        parse_reply(op, data)


def test_fail_frames_become_typed_errors():
    refused = parse_reply(Op.GET, frame(Frame.FAIL, bytes(4) + b"bad magic"))
    with pytest.raises(AgentError, match="refused the request: bad magic") as caught:
        refused.raise_failure()
    assert not isinstance(caught.value, GuestOSError)
    failed = parse_reply(Op.GET, frame(Frame.FAIL, struct.pack("<I", errno.EACCES) + b"cannot open /x"))
    with pytest.raises(GuestOSError) as raised:
        failed.raise_failure()
    assert (raised.value.errno, raised.value.strerror) == (errno.EACCES, "cannot open /x")


class Flaky:
    """Refuses ``refusals`` times, then connects to the real agent."""

    def __init__(self, path: Path, refusals: int) -> None:
        self.real = UnixConnector(path)
        self.refusals = refusals
        self.attempts = 0

    def connect(self, port: int, timeout: float | None = 10.0) -> socket.socket:
        self.attempts += 1
        if self.attempts <= self.refusals:
            raise ConnectionRefusedError(f"the guest refused vsock port {port}")
        return self.real.connect(port, timeout)


def test_connecting_retries_while_the_agent_refuses(socket_path):
    flaky = Flaky(socket_path, refusals=3)
    assert Agent(flaky).exec("echo up").stdout == b"up\n"
    assert flaky.attempts == 4


def test_an_agent_that_never_answers_is_an_agent_error_at_the_deadline(socket_path):
    flaky = Flaky(socket_path, refusals=10**6)
    started = time.monotonic()
    with pytest.raises(AgentError, match=r"did not answer on vsock port 1024.*refused"):
        Agent(flaky, connect_timeout=0.5).exec("true")
    assert 0.5 <= time.monotonic() - started < 3
    with pytest.raises(AgentError, match="did not answer"):
        Agent(flaky).exec("true", timeout=0.3)


def test_a_stopped_vm_fails_at_once(socket_path):
    connector = UnixConnector(socket_path)
    with pytest.raises(AgentError, match="not running"):
        Agent(connector, alive=lambda: False).exec("true")
    assert connector.attempts == 0


def test_agent_errors_are_kvmkit_errors():
    for error in (AgentError, AgentTimeout, CommandFailed, GuestOSError):
        assert issubclass(error, KvmkitError)
    assert issubclass(AgentTimeout, TimeoutError)


@pytest.mark.kvm
def test_a_vm_without_vsock_raises_agent_error_at_once(tmp_path):
    with kvmkit.VM(memory="2M") as vm:
        started = time.monotonic()
        with pytest.raises(AgentError, match="no vsock device"):
            vm.exec("true")
        with pytest.raises(AgentError, match="no vsock device"):
            vm.get_file("/etc/hostname")
        assert time.monotonic() - started < 1
        vm.add_vsock(3, tmp_path / "v.sock")
        with pytest.raises(AgentError, match="not running"):
            vm.put_file("/tmp/x", b"")


# --------------------------------------------------------------------------- the default guest's recipe


def test_the_agent_is_built_static(agent_binary):
    elf = agent_binary.read_bytes()
    assert elf[:4] == b"\x7fELF"
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    types = [struct.unpack_from("<I", elf, phoff + i * phentsize)[0] for i in range(phnum)]
    assert 3 not in types, "PT_INTERP: the agent is dynamically linked"


def test_no_compiler_is_an_image_error(tmp_path):
    with pytest.raises(ImageError, match=r"needs a C compiler.*libc6-dev"):
        images.build_agent(tmp_path / "agent", cc="kvmkit-no-such-cc")


def test_init_starts_the_agent_after_the_modules_and_before_ready():
    lines = images.init_script(["lib/modules/x/vsock.ko"]).splitlines()
    start = next(i for i, line in enumerate(lines) if "/sbin/kvmkit-agent" in line)
    assert lines.index("load /lib/modules/x/vsock.ko") < start < lines.index("echo kvmkit-guest-ready")
    assert lines[start].endswith("&"), "the agent runs in the background"
    assert images.VSOCK_DRIVER in lines[start]
    assert "kvmkit-agent" not in images.init_script([], agent=None)


def test_the_recipe_follows_the_agent_source_and_init(monkeypatch):
    recipe = images.guest_recipe()
    assert recipe == images.guest_recipe()
    monkeypatch.setattr(images, "agent_source", lambda: b"int main(void) { return 0; }\n")
    changed = images.guest_recipe()
    assert changed != recipe
    monkeypatch.setattr(images, "AGENT_PATH", "sbin/another-agent")
    assert images.guest_recipe() != changed


def test_the_initramfs_carries_the_agent():
    from test_images import read_newc

    entries = read_newc(images.build_initramfs(b"busybox", [], b"\x7fELF-agent"))
    assert entries["sbin/kvmkit-agent"].data == b"\x7fELF-agent"
    assert entries["sbin/kvmkit-agent"].mode & 0o777 == 0o755
    assert b"/sbin/kvmkit-agent" in entries["init"].data
    assert "sbin/kvmkit-agent" not in read_newc(images.build_initramfs(b"busybox", []))
