"""The serial console of a Linux guest: its output, input to it, and waiting for text."""

from __future__ import annotations

import asyncio
import os
import re
import select
import socket
import threading
import time
from typing import IO, TYPE_CHECKING, Any, Union, overload

from kvmkit import _aio
from kvmkit.errors import ConfigError, ConsoleTimeout, KvmkitError, check_timeout

if TYPE_CHECKING:
    from kvmkit._core import Vm as _CoreVm

Pattern = Union[str, bytes, "re.Pattern[bytes]"]
"""A regular expression; text patterns are matched against the UTF-8 output."""


class _Marker:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return f"kvmkit.console.{self._name}"


EOF = _Marker("EOF")
"""In a list given to :meth:`Console.expect`: the VM stopped and all its output was read."""
TIMEOUT = _Marker("TIMEOUT")
"""In a list given to :meth:`Console.expect`: the timeout passed (instead of raising)."""

Expected = Union[Pattern, _Marker]

_WAIT_SLICE = 0.2  # how often a waiting expect() checks whether the VM still runs
_TAIL = 2000  # how much output a timeout error shows


class Console:
    """COM1 of a Linux guest. Output is kept from the start of the VM; :meth:`read` and
    :meth:`expect` consume it from a cursor, as pexpect does."""

    def __init__(self, core: _CoreVm) -> None:
        self._core = core
        self._cursor = 0
        self._bridge: socket.socket | None = None
        self.before = b""
        """After :meth:`expect`: the output read before what matched (all of it, at EOF or a
        timeout)."""
        self.after: bytes | _Marker = b""
        """After :meth:`expect`: what matched, or :data:`EOF` or :data:`TIMEOUT`."""
        self.match: re.Match[bytes] | None = None
        """After :meth:`expect`: the match, or None at EOF or a timeout."""

    @property
    def output(self) -> bytes:
        """Everything the guest printed (the most recent 16 MiB)."""
        return self._core.console_read(0, 0.0)[1]

    def read(self, timeout: float = 0.0) -> bytes:
        """Output not yet read, waiting up to ``timeout`` seconds for some."""
        start, data = self._core.console_read(self._cursor, timeout)
        self._cursor = start + len(data)
        return data

    def write(self, data: str | bytes) -> None:
        """Sends input to the guest, as if typed."""
        self._core.console_write(data.encode() if isinstance(data, str) else bytes(data))

    def sendline(self, line: str | bytes = "") -> None:
        """Sends ``line`` and a newline."""
        self.write((line.encode() if isinstance(line, str) else line) + b"\n")

    @overload
    def expect(self, pattern: Pattern, timeout: float = 30.0) -> re.Match[bytes]: ...

    @overload
    def expect(self, pattern: list[Expected] | tuple[Expected, ...], timeout: float = 30.0) -> int: ...

    def expect(
        self, pattern: Pattern | list[Expected] | tuple[Expected, ...], timeout: float = 30.0
    ) -> re.Match[bytes] | int:
        """Waits until unread output matches ``pattern`` and returns the match; the cursor moves
        past it. Raises :class:`~kvmkit.errors.ConsoleTimeout` (saying why: the timeout, or how the
        VM stopped, with the output's tail) when ``timeout`` passes or the VM stops first.

        As pexpect does, ``pattern`` may be a list of patterns, and of :data:`EOF` (the VM stopped
        and its output is all read) and :data:`TIMEOUT`: then the index of the one that matched
        first in the output is returned, and EOF and TIMEOUT, when listed, are returned rather than
        raised. Either way :attr:`before`, :attr:`after` and :attr:`match` tell what was read."""
        search = _Search(self, pattern, timeout)
        deadline = time.monotonic() + timeout
        while (found := search.step()) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return search.end(TIMEOUT)
            search.read_more(min(left, _WAIT_SLICE))
        return found

    @overload
    async def expect_async(self, pattern: Pattern, timeout: float = 30.0) -> re.Match[bytes]: ...

    @overload
    async def expect_async(
        self, pattern: list[Expected] | tuple[Expected, ...], timeout: float = 30.0
    ) -> int: ...

    async def expect_async(
        self, pattern: Pattern | list[Expected] | tuple[Expected, ...], timeout: float = 30.0
    ) -> re.Match[bytes] | int:
        """:meth:`expect` for asyncio: waits on eventfds (the console's next output, the run's
        end) that the event loop watches, not by polling."""
        loop = asyncio.get_running_loop()
        search = _Search(self, pattern, timeout)
        deadline = loop.time() + timeout
        while True:
            output_fd = self._core.console_arm()  # before looking, so no output slips between
            found = search.step()
            if found is not None:
                return found
            left = deadline - loop.time()
            if left <= 0:
                return search.end(TIMEOUT)
            await _aio.readable([output_fd, self._core.run_end_fd], left)

    def _why_stopped(self) -> str:
        if self._core.closed:
            return "the VM was closed"
        last = self._core.last_exit
        return f"the VM stopped ({last['reason']})" if last else "the VM is not running"

    def _has_more(self, offset: int) -> bool:
        return bool(self._core.console_read(offset, 0.0)[1])

    def fileno(self) -> int:
        """A file descriptor carrying the console both ways (all output from the start, and input
        to the guest), for tools such as ``pexpect.fdpexpect.fdspawn``. It is one end of a socket
        pair; a thread moves bytes between the other end and the console until the VM's run ends
        (not a pause) and its output is all passed on, or the VM is closed: the descriptor then
        reaches end of file, as a terminal does when its program exits."""
        if self._bridge is None:
            ours, theirs = socket.socketpair()
            threading.Thread(target=self._pump, args=(ours,), name="kvmkit-console-fd", daemon=True).start()
            self._bridge = theirs
        return self._bridge.fileno()

    def _pump(self, ours: socket.socket) -> None:
        offset = 0
        with ours:
            while not self._core.closed:
                ended = self._run_ended()  # asked before reading, so the last output still goes
                start, data = self._core.console_read(offset, 0.05)
                if ended and not data:
                    return
                try:
                    if data:
                        ours.sendall(data)
                    offset = start + len(data)
                    while select.select([ours], [], [], 0)[0]:
                        typed = ours.recv(4096)
                        if not typed:
                            return
                        self._core.console_write(typed)
                except OSError:  # the other end is gone
                    return

    def _run_ended(self) -> bool:
        try:
            core = self._core
            return not core.running and not core.paused and core.last_exit is not None
        except KvmkitError:  # closed meanwhile
            return True

    def log_to(self, target: str | os.PathLike[str] | IO[Any]) -> None:
        """Copies all further output to ``target``: appended to the file at a path, or written
        through an open file's descriptor (such as ``sys.stdout``) after what the file object has
        written so far. Pass the open file rather than a path naming it (``/dev/stdout``,
        ``/proc/self/fd/1``): a second opening of a regular file keeps an offset of its own, and
        the two writers then overwrite each other."""
        if isinstance(target, (str, os.PathLike)):
            self._core.console_log(os.fspath(target))
            return
        target.flush()
        self._core.console_log_fd(os.dup(target.fileno()))  # which owns the duplicate, even on failure


class _Search:
    """One expect(): the output read so far from the cursor, matched against what is expected."""

    def __init__(
        self, console: Console, pattern: Pattern | list[Expected] | tuple[Expected, ...], timeout: float
    ):
        check_timeout(timeout)
        self.expected: list[Expected]
        if isinstance(pattern, (str, bytes, re.Pattern)):
            self.single, self.expected = True, [pattern]
        elif isinstance(pattern, (list, tuple)):
            self.single, self.expected = False, list(pattern)
        else:
            raise TypeError(f"expect() takes a pattern or a list of them, not {type(pattern).__name__}")
        if not self.expected:
            raise ConfigError("expect() needs at least one pattern")
        self.regexes = [(i, _compile(p)) for i, p in enumerate(self.expected) if not isinstance(p, _Marker)]
        self.console, self.timeout = console, timeout
        self.start, self.seen = console._core.console_read(console._cursor, 0.0)

    def step(self) -> re.Match[bytes] | int | None:
        """The result if the output read so far decides it (a match, or the VM's end), else None."""
        self.read_more(0.0)
        found = [(m.start(), i, m) for i, regex in self.regexes if (m := regex.search(self.seen)) is not None]
        if found:
            _, index, match = min(found, key=lambda hit: (hit[0], hit[1]))
            console = self.console
            console._cursor = self.start + match.end()
            console.before, console.after, console.match = self.seen[: match.start()], match.group(0), match
            return match if self.single else index
        if not self.console._core.running and not self.console._has_more(self.start + len(self.seen)):
            return self.end(EOF)
        return None

    def read_more(self, wait: float) -> None:
        more_start, more = self.console._core.console_read(self.start + len(self.seen), wait)
        if more_start > self.start + len(self.seen):  # old output was dropped meanwhile
            self.start, self.seen = more_start, more
        else:
            self.seen += more

    def end(self, end: _Marker) -> int:
        """The result at EOF or a timeout: its index when expected, else ConsoleTimeout."""
        console = self.console
        console._cursor = self.start + len(self.seen)
        console.before, console.after, console.match = self.seen, end, None
        if end in self.expected:
            return self.expected.index(end)
        why = f"{self.timeout} s passed" if end is TIMEOUT else console._why_stopped()
        wanted = " or ".join(repr(regex.pattern) for _, regex in self.regexes) or "its end"
        raise ConsoleTimeout(
            f"{why} before the console showed {wanted}; last output:\n"
            + self.seen[-_TAIL:].decode(errors="replace")
        )


def _compile(pattern: Pattern) -> re.Pattern[bytes]:
    if isinstance(pattern, re.Pattern):
        return pattern
    return re.compile(pattern.encode() if isinstance(pattern, str) else pattern)
