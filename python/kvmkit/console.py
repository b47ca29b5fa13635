"""The serial console of a Linux guest: its output, input to it, and waiting for text."""

from __future__ import annotations

import os
import re
import select
import socket
import threading
import time
from typing import IO, TYPE_CHECKING, Any, Union

from kvmkit.errors import ConsoleTimeout

if TYPE_CHECKING:
    from kvmkit._core import Vm as _CoreVm

Pattern = Union[str, bytes, "re.Pattern[bytes]"]
"""A regular expression; text patterns are matched against the UTF-8 output."""

_WAIT_SLICE = 0.2  # how often a waiting expect() checks whether the VM still runs
_TAIL = 2000  # how much output a timeout error shows


class Console:
    """COM1 of a Linux guest. Output is kept from the start of the VM; :meth:`read` and
    :meth:`expect` consume it from a cursor, as pexpect does."""

    def __init__(self, core: _CoreVm) -> None:
        self._core = core
        self._cursor = 0
        self._bridge: socket.socket | None = None

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

    def expect(self, pattern: Pattern, timeout: float = 30.0) -> re.Match[bytes]:
        """Waits until unread output matches ``pattern`` and returns the match; the cursor moves
        past it. Raises :class:`~kvmkit.errors.ConsoleTimeout` (with the output's tail) when
        ``timeout`` passes or the VM stops first."""
        regex = _compile(pattern)
        deadline = time.monotonic() + timeout
        start, seen = self._core.console_read(self._cursor, 0.0)
        while True:
            match = regex.search(seen)
            if match is not None:
                self._cursor = start + match.end()
                return match
            left = deadline - time.monotonic()
            stopped = not self._core.running
            if left <= 0 or (stopped and not self._has_more(start + len(seen))):
                why = "the VM stopped" if stopped else f"{timeout} s passed"
                raise ConsoleTimeout(
                    f"{why} before the console showed {regex.pattern!r}; last output:\n"
                    + seen[-_TAIL:].decode(errors="replace")
                )
            more_start, more = self._core.console_read(start + len(seen), min(left, _WAIT_SLICE))
            if more_start > start + len(seen):  # old output was dropped meanwhile
                start, seen = more_start, more
            else:
                seen += more

    def _has_more(self, offset: int) -> bool:
        return bool(self._core.console_read(offset, 0.0)[1])

    def fileno(self) -> int:
        """A file descriptor carrying the console both ways (all output from the start, and input
        to the guest), for tools such as ``pexpect.fdpexpect.fdspawn``. It is one end of a socket
        pair; a thread moves bytes between the other end and the console until the VM closes."""
        if self._bridge is None:
            ours, theirs = socket.socketpair()
            threading.Thread(target=self._pump, args=(ours,), name="kvmkit-console-fd", daemon=True).start()
            self._bridge = theirs
        return self._bridge.fileno()

    def _pump(self, ours: socket.socket) -> None:
        offset = 0
        with ours:
            while not self._core.closed:
                start, data = self._core.console_read(offset, 0.05)
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


def _compile(pattern: Pattern) -> re.Pattern[bytes]:
    if isinstance(pattern, re.Pattern):
        return pattern
    return re.compile(pattern.encode() if isinstance(pattern, str) else pattern)
