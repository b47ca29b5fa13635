"""Attaching a guest console to the terminal, QEMU style: raw mode, Ctrl-A x to quit."""

from __future__ import annotations

import contextlib
import os
import select
import sys
import termios
import threading
import tty
from collections.abc import Callable, Iterator

ESCAPE = 0x01  # Ctrl-A
QUIT = ord("x")
HELP = "[kvmkit] console attached; Ctrl-A x quits, Ctrl-A Ctrl-A sends Ctrl-A\r\n"


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    """Puts the terminal at ``fd`` in raw mode (if it is one) and restores it afterwards."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


class InputPump:
    """Forwards bytes from ``fd`` to ``send`` on a thread until told to stop, EOF, or the quit
    sequence, after which it calls ``quit``."""

    def __init__(self, fd: int, send: Callable[[bytes], None], quit: Callable[[], object]) -> None:
        self._fd, self._send, self._quit = fd, send, quit
        self._stop = threading.Event()
        self._escaped = False
        self._thread = threading.Thread(target=self._pump, name="kvmkit-console-input", daemon=True)

    def __enter__(self) -> InputPump:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=1)

    def _pump(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._fd], [], [], 0.1)
            if not ready:
                continue
            data = os.read(self._fd, 1024)
            if not data:
                return
            forward = self.filter(data)
            if forward is None:
                self._quit()
                return
            if forward:
                self._send(forward)

    def filter(self, data: bytes) -> bytes | None:
        """The bytes to forward, or None when the quit sequence was typed."""
        out = bytearray()
        for byte in data:
            if self._escaped:
                self._escaped = False
                if byte == QUIT:
                    return None
                if byte == ESCAPE:
                    out.append(ESCAPE)
                continue
            if byte == ESCAPE:
                self._escaped = True
            else:
                out.append(byte)
        return bytes(out)


def stdin_fd() -> int:
    return sys.stdin.fileno()
