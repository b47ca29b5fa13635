"""The guest agent's client: run commands in a Linux guest and move files in and out over vsock.

kvmkit's default guest (:func:`kvmkit.images.default_guest`) carries a small agent
(``guests/agent.c``, built with the guest) that its ``/init`` starts when the vsock driver is
there. It listens on vsock port :data:`AGENT_PORT`; :class:`Agent` reaches it through a
:class:`~kvmkit.virtio.Vsock` device's Unix socket. :meth:`kvmkit.VM.exec`,
:meth:`~kvmkit.VM.put_file` and :meth:`~kvmkit.VM.get_file` use the VM's first vsock device.

The protocol (version 1; the agent's source describes it too). One request per connection, one
reply, then the agent closes the connection. Integers are u32 little-endian; a *string* is a u32
length and that many bytes without NUL::

    request = b"KVA1" op:u32 body
      EXEC (1): flags:u32 timeout_ms:u32 argc:u32 argv:string[argc] stdin_len:u32 stdin
                flags bit 0 (SHELL): one string, run by /bin/sh -c; timeout_ms 0: no limit
      PUT  (2): mode:u32 path:string data_len:u32 data
      GET  (3): path:string
    reply = frame* where frame = kind:u32 len:u32 payload, ending with EXIT, DONE or FAIL
      STDOUT (1), STDERR (2): a command's output; DATA (3): a file's bytes (64 KiB at most each)
      EXIT (4): how:u32 code:u32 -- 0 exited with status code, 1 killed by signal code,
                2 timed out (its process group was killed)
      DONE (5): a PUT or GET succeeded
      FAIL (6): errno:u32 message -- errno 0 for a malformed request, else the guest's errno

The agent streams stdin into the command while it sends the output back, so the client sends and
receives at the same time (:class:`Agent` does, on a non-blocking socket).
"""

from __future__ import annotations

import enum
import errno as errno_codes
import logging
import math
import os
import selectors
import shlex
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol, Union

from kvmkit.errors import AgentError, AgentTimeout, CommandFailed, ConfigError, GuestOSError

if TYPE_CHECKING:
    from typing_extensions import Buffer

log = logging.getLogger(__name__)

__all__ = ["AGENT_PORT", "Agent", "Connector", "ExecResult"]

#: The vsock port the guest agent listens on.
AGENT_PORT = 1024
MAGIC = b"KVA1"
#: Seconds to wait for the agent to answer when no timeout is given (the guest may still boot).
CONNECT_TIMEOUT = 60.0
#: Seconds past a command's timeout that the agent gets to kill it and reply.
REPLY_GRACE = 10.0
#: Limits the agent enforces; the client checks them first for a clear error.
MAX_ARGC = 4096
MAX_ARGV_BYTES = 1 << 20
MAX_PATH = 4096
MAX_LENGTH = (1 << 32) - 1
MAX_PAYLOAD = 64 << 10
MAX_MESSAGE = 1024
EXEC_SHELL = 1

_HEADER = struct.Struct("<II")
_SEND_SIZE = 256 << 10
_RECV_SIZE = 256 << 10
#: How often a wait for the agent checks that the VM still runs.
_TICK = 0.5

PathArg = Union[str, bytes, os.PathLike[str], os.PathLike[bytes]]
Command = Union[str, Sequence[PathArg]]
"""A shell command line (run by ``/bin/sh -c``), or an argv list."""


class Op(enum.IntEnum):
    EXEC = 1
    PUT = 2
    GET = 3


class Frame(enum.IntEnum):
    STDOUT = 1
    STDERR = 2
    DATA = 3
    EXIT = 4
    DONE = 5
    FAIL = 6


class How(enum.IntEnum):
    EXITED = 0
    SIGNALED = 1
    TIMED_OUT = 2


class ExecResult(NamedTuple):
    """What a command run in the guest left."""

    stdout: bytes
    stderr: bytes
    status: int
    """Its exit status, or minus the signal that killed it (as in :mod:`subprocess`)."""


class Connector(Protocol):
    """What :class:`Agent` connects through: a :class:`~kvmkit.virtio.Vsock` device."""

    def connect(self, port: int, timeout: float | None = ...) -> socket.socket: ...


# --------------------------------------------------------------------------- requests


def _string(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


def encode_exec(argv: Sequence[bytes], *, shell: bool, stdin_len: int, timeout_ms: int) -> bytes:
    """An EXEC request up to its stdin bytes (which follow it)."""
    head = MAGIC + struct.pack("<IIII", Op.EXEC, EXEC_SHELL if shell else 0, timeout_ms, len(argv))
    return head + b"".join(_string(arg) for arg in argv) + struct.pack("<I", stdin_len)


def encode_put(path: bytes, mode: int, data_len: int) -> bytes:
    """A PUT request up to its data bytes (which follow it)."""
    return MAGIC + struct.pack("<II", Op.PUT, mode) + _string(path) + struct.pack("<I", data_len)


def encode_get(path: bytes) -> bytes:
    """A GET request."""
    return MAGIC + struct.pack("<I", Op.GET) + _string(path)


# --------------------------------------------------------------------------- replies


_FINAL = frozenset({Frame.EXIT, Frame.DONE, Frame.FAIL})
_ALLOWED = {
    Op.EXEC: {Frame.STDOUT, Frame.STDERR, Frame.EXIT, Frame.FAIL},
    Op.PUT: {Frame.DONE, Frame.FAIL},
    Op.GET: {Frame.DATA, Frame.DONE, Frame.FAIL},
}


class Reply:
    """A reply read incrementally: :meth:`feed` the bytes as they come, :meth:`eof` at the end.
    Anything the protocol does not allow raises :class:`AgentError`."""

    def __init__(self, op: Op) -> None:
        self.op = op
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.data = bytearray()
        self.end: Frame | None = None
        """The frame that ended the reply, once it came."""
        self.how = How.EXITED
        self.code = 0
        self.errno = 0
        self.message = ""
        self._buffer = bytearray()

    @property
    def done(self) -> bool:
        return self.end is not None

    def feed(self, chunk: bytes) -> None:
        if self.end is not None:
            raise AgentError(f"protocol error: {len(chunk)} bytes after the end of the agent's reply")
        self._buffer += chunk
        position = 0
        while len(self._buffer) - position >= _HEADER.size:
            kind, length = _HEADER.unpack_from(self._buffer, position)
            self._check(kind, length)
            start = position + _HEADER.size
            if len(self._buffer) - start < length:
                break
            self._frame(Frame(kind), bytes(self._buffer[start : start + length]))
            position = start + length
            if self.end is not None and position < len(self._buffer):
                raise AgentError(
                    f"protocol error: {len(self._buffer) - position} bytes after the end of the agent's reply"
                )
        del self._buffer[:position]

    def eof(self) -> None:
        """The agent closed the connection: fine after the last frame, an error before."""
        if self.end is None:
            state = f" in the middle of a frame ({len(self._buffer)} bytes)" if self._buffer else ""
            raise AgentError(f"the agent closed the connection before the end of its reply{state}")

    def _check(self, kind: int, length: int) -> None:
        try:
            frame = Frame(kind)
        except ValueError:
            raise AgentError(f"protocol error: unknown frame kind {kind} in the agent's reply") from None
        if frame not in _ALLOWED[self.op]:
            raise AgentError(f"protocol error: a {frame.name} frame in the reply to {self.op.name}")
        limits = {
            Frame.EXIT: (8, 8),
            Frame.DONE: (0, 0),
            Frame.FAIL: (4, 4 + MAX_MESSAGE),
        }
        low, high = limits.get(frame, (1, MAX_PAYLOAD))
        if not low <= length <= high:
            raise AgentError(f"protocol error: a {frame.name} frame of {length} bytes in the agent's reply")

    def _frame(self, frame: Frame, payload: bytes) -> None:
        if frame is Frame.STDOUT:
            self.stdout += payload
        elif frame is Frame.STDERR:
            self.stderr += payload
        elif frame is Frame.DATA:
            self.data += payload
        elif frame is Frame.EXIT:
            how, self.code = struct.unpack("<II", payload)
            try:
                self.how = How(how)
            except ValueError:
                raise AgentError(f"protocol error: unknown exit kind {how} in the agent's reply") from None
        elif frame is Frame.FAIL:
            (self.errno,) = struct.unpack_from("<I", payload)
            self.message = payload[4:].decode(errors="replace")
        if frame in _FINAL:
            self.end = frame

    def raise_failure(self) -> None:
        """Raises what a FAIL frame says: :class:`GuestOSError` for an errno, else :class:`AgentError`."""
        if self.end is not Frame.FAIL:
            return
        if self.errno == 0:
            raise AgentError(f"the agent refused the request: {self.message}")
        raise GuestOSError(self.errno, self.message)


def parse_reply(op: Op, data: bytes) -> Reply:
    """The whole reply ``data`` to an ``op`` request, checked (:class:`AgentError` if malformed)."""
    reply = Reply(op)
    reply.feed(data)
    reply.eof()
    return reply


# --------------------------------------------------------------------------- the client


def _fsencode(value: PathArg, what: str) -> bytes:
    try:
        encoded = os.fsencode(value)
    except TypeError:
        raise ConfigError(f"{what} must be a str, bytes or path, not {type(value).__name__}") from None
    if b"\0" in encoded:
        raise ConfigError(f"{what} contains a NUL byte: {value!r}")
    return encoded


def _argv(command: Command) -> tuple[list[bytes], bool]:
    if isinstance(command, str):
        argv, shell = [_fsencode(command, "a shell command")], True
    elif isinstance(command, (bytes, bytearray)):
        raise ConfigError("pass a command as a str (run by /bin/sh -c) or a list of arguments, not bytes")
    else:
        argv, shell = [_fsencode(arg, "an argument") for arg in command], False
        if not argv:
            raise ConfigError("the argument list is empty")
    if len(argv) > MAX_ARGC:
        raise ConfigError(f"{len(argv)} arguments; the agent takes at most {MAX_ARGC}")
    if sum(len(arg) + 1 for arg in argv) > MAX_ARGV_BYTES:
        raise ConfigError(f"the arguments are longer than the agent takes ({MAX_ARGV_BYTES} bytes)")
    return argv, shell


def _payload(data: Buffer | str, what: str) -> memoryview:
    view = memoryview(data.encode() if isinstance(data, str) else data).cast("B")
    if len(view) > MAX_LENGTH:
        raise ConfigError(f"{what} is {len(view)} bytes; the agent takes at most {MAX_LENGTH}")
    return view


def _path(path: PathArg) -> bytes:
    encoded = _fsencode(path, "a path")
    if not encoded or len(encoded) > MAX_PATH:
        raise ConfigError(f"a path must be 1 to {MAX_PATH} bytes, not {len(encoded)}")
    return encoded


def _describe(argv: Sequence[bytes], shell: bool) -> str:
    words = [os.fsdecode(arg) for arg in argv]
    return repr(words[0]) if shell else shlex.join(words)


def _check_timeout(timeout: float | None) -> None:
    if timeout is not None and not timeout > 0:
        raise ConfigError(f"a timeout must be positive seconds or None, not {timeout!r}")


class _Expired(Exception):
    """The client's own deadline passed while it waited for the reply."""


class Agent:
    """The client of the guest agent behind ``vsock`` (any :class:`Connector`), on ``port``.

    Each call opens a connection, retrying while the agent refuses (the guest may still be booting)
    until its timeout, or ``connect_timeout`` seconds when it has none. ``alive``, if given, says
    whether the VM still runs: a stopped VM fails a call at once instead of at its deadline.
    """

    def __init__(
        self,
        vsock: Connector,
        port: int = AGENT_PORT,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        alive: Callable[[], bool] | None = None,
    ) -> None:
        self.vsock = vsock
        self.port = port
        self.connect_timeout = connect_timeout
        self._alive = alive

    def __repr__(self) -> str:
        return f"<kvmkit.agent.Agent on vsock port {self.port} of {self.vsock!r}>"

    def exec(
        self,
        command: Command,
        *,
        input: Buffer | str | None = None,
        timeout: float | None = None,
        check: bool = False,
    ) -> ExecResult:
        """Runs ``command`` in the guest: a str through ``/bin/sh -c``, a list as argv (looked up
        in the guest's ``PATH``), with ``input`` (bytes, or a str sent as UTF-8) on its stdin.

        ``timeout`` bounds the whole call, waiting for the agent included; when it passes, the
        agent kills the command's process group and :class:`~kvmkit.errors.AgentTimeout` (with
        the output so far) is raised. ``check=True`` raises
        :class:`~kvmkit.errors.CommandFailed` for a non-zero status. A program that cannot be
        executed raises :class:`~kvmkit.errors.GuestOSError`; an agent that cannot be reached or
        breaks the protocol, :class:`~kvmkit.errors.AgentError`.
        """
        _check_timeout(timeout)
        argv, shell = _argv(command)
        stdin = _payload(b"" if input is None else input, "the input")
        described = _describe(argv, shell)
        start = time.monotonic()
        sock = self._connect(start + (self.connect_timeout if timeout is None else timeout))
        timeout_ms, deadline = 0, None
        if timeout is not None:
            left = start + timeout - time.monotonic()
            timeout_ms = min(MAX_LENGTH, max(1, math.ceil(left * 1000)))
            deadline = start + timeout + REPLY_GRACE
        request = encode_exec(argv, shell=shell, stdin_len=len(stdin), timeout_ms=timeout_ms)
        reply = Reply(Op.EXEC)
        try:
            self._exchange(sock, [request, stdin], reply, deadline)
        except _Expired:
            raise AgentTimeout(
                f"the agent did not reply to {described} within {timeout:g} s (and {REPLY_GRACE:g} s more)",
                stdout=bytes(reply.stdout),
                stderr=bytes(reply.stderr),
            ) from None
        reply.raise_failure()
        stdout, stderr = bytes(reply.stdout), bytes(reply.stderr)
        if reply.how is How.TIMED_OUT:
            raise AgentTimeout(
                f"{described} did not end within {timeout:g} s; the agent killed it",
                stdout=stdout,
                stderr=stderr,
            )
        status = -reply.code if reply.how is How.SIGNALED else reply.code
        result = ExecResult(stdout, stderr, status)
        if check and status != 0:
            ending = f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
            tail = stderr.decode(errors="replace").strip()[-500:]
            raise CommandFailed(f"{described} {ending}" + (f": {tail}" if tail else ""), result)
        return result

    def put_file(
        self, path: PathArg, data: Buffer | str, mode: int = 0o644, *, timeout: float | None = None
    ) -> None:
        """Writes ``data`` (bytes, or a str as UTF-8) to the guest file ``path``, creating or
        truncating it, and gives a regular file the permission bits ``mode``. The directory must
        exist. Errors in the guest raise :class:`~kvmkit.errors.GuestOSError`."""
        _check_timeout(timeout)
        if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777:
            raise ConfigError(f"mode must be permission bits from 0 to 0o7777, not {mode!r}")
        encoded = _path(path)
        payload = _payload(data, "the data")
        reply = self._call(Op.PUT, [encode_put(encoded, mode, len(payload)), payload], timeout, path)
        reply.raise_failure()

    def get_file(self, path: PathArg, *, timeout: float | None = None) -> bytes:
        """The contents of the guest file ``path``. Errors in the guest (a missing file, a
        directory) raise :class:`~kvmkit.errors.GuestOSError` with the guest's errno."""
        _check_timeout(timeout)
        reply = self._call(Op.GET, [encode_get(_path(path))], timeout, path)
        reply.raise_failure()
        return bytes(reply.data)

    # Plumbing

    def _call(self, op: Op, request: list[bytes | memoryview], timeout: float | None, path: PathArg) -> Reply:
        start = time.monotonic()
        sock = self._connect(start + (self.connect_timeout if timeout is None else timeout))
        reply = Reply(op)
        try:
            self._exchange(sock, request, reply, None if timeout is None else start + timeout)
        except _Expired:
            raise AgentTimeout(
                f"{op.name} of {os.fsdecode(path)!r} did not end within {timeout:g} s"
            ) from None
        return reply

    def _check_alive(self) -> None:
        if self._alive is not None and not self._alive():
            raise AgentError("the VM is not running, so its guest agent cannot answer")

    def _connect(self, deadline: float) -> socket.socket:
        """A connection to the agent, retrying while it refuses or does not answer, until ``deadline``."""
        delay = 0.05
        attempts = 0
        last: Exception | None = None
        while True:
            self._check_alive()
            left = deadline - time.monotonic()
            if left <= 0:
                break
            attempts += 1
            try:
                return self.vsock.connect(self.port, timeout=min(left, 5.0))
            except FileNotFoundError as error:
                raise AgentError(
                    f"the vsock device's socket is gone ({error}); was the VM closed?"
                ) from error
            except (ConnectionError, TimeoutError, socket.timeout) as error:
                last = error
            except OSError as error:
                raise AgentError(f"cannot connect to the vsock device: {error}") from error
            time.sleep(max(0.0, min(delay, deadline - time.monotonic())))
            delay = min(delay * 2, 0.5)
        why = f"; the last attempt: {last}" if last is not None else ""
        raise AgentError(
            f"the guest agent did not answer on vsock port {self.port} ({attempts} attempts until the "
            f"deadline){why}. Does the guest run it? kvmkit's default guest does."
        )

    def _exchange(
        self, sock: socket.socket, request: list[bytes | memoryview], reply: Reply, deadline: float | None
    ) -> None:
        """Sends ``request`` while reading ``reply`` until it ends (or ``deadline``: _Expired)."""
        pending = deque(memoryview(part).cast("B") for part in request if len(part))
        with sock, selectors.DefaultSelector() as selector:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if pending else 0))
            while not reply.done:
                wait = _TICK
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise _Expired
                    wait = min(wait, left)
                events = selector.select(wait)
                if not events:
                    self._check_alive()
                    continue
                mask = events[0][1]
                if mask & selectors.EVENT_READ:
                    self._receive(sock, reply)
                if mask & selectors.EVENT_WRITE and pending:
                    try:
                        sent = sock.send(pending[0][:_SEND_SIZE])
                    except (BlockingIOError, InterruptedError):
                        sent = 0
                    except OSError as error:
                        # The agent stopped taking the request; its reply (read on) says why.
                        log.debug("the agent stopped reading the request: %s", error)
                        pending.clear()
                        sent = 0
                    if pending:
                        if sent == len(pending[0]):
                            pending.popleft()
                        else:
                            pending[0] = pending[0][sent:]
                    if not pending:
                        selector.modify(sock, selectors.EVENT_READ)

    @staticmethod
    def _receive(sock: socket.socket, reply: Reply) -> None:
        try:
            chunk = sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            if error.errno in (errno_codes.ECONNRESET, errno_codes.EPIPE):
                reply.eof()  # an error unless the reply had ended
                return
            raise AgentError(f"reading the agent's reply failed: {error}") from error
        if chunk:
            reply.feed(chunk)
        else:
            reply.eof()
