"""Waiting on the eventfds kvmkit signals (a run's end, console output) from asyncio loops.

Each descriptor gets one reader per event loop, shared by every task waiting on it: the reader
clears the eventfd and wakes them all, and each looks again at what it waits for. A task that
subscribes while the descriptor is already readable wakes at once, so nothing is missed between
looking and waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Sequence


class _Signal:
    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        self.loop, self.fd = loop, fd
        self.waiters: set[asyncio.Future[None]] = set()

    def add(self, waiter: asyncio.Future[None]) -> None:
        if not self.waiters:
            self.loop.add_reader(self.fd, self._fire)
        self.waiters.add(waiter)

    def remove(self, waiter: asyncio.Future[None]) -> bool:
        """Drops ``waiter``; True when none is left (and the reader is gone)."""
        self.waiters.discard(waiter)
        if self.waiters:
            return False
        self.loop.remove_reader(self.fd)
        return True

    def _fire(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self.fd, 8)
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(None)


_signals: dict[tuple[int, int], _Signal] = {}


async def readable(fds: Sequence[int], timeout: float | None = None) -> None:
    """Returns once any of the eventfds ``fds`` was signalled (clearing it), or after ``timeout``
    seconds."""
    loop = asyncio.get_running_loop()
    woke: asyncio.Future[None] = loop.create_future()
    keys = [(id(loop), fd) for fd in fds]
    for key in keys:
        _signals.setdefault(key, _Signal(loop, key[1])).add(woke)
    try:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(woke, timeout)
    finally:
        for key in keys:
            if _signals[key].remove(woke):
                del _signals[key]
