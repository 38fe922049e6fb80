"""A byte budget handed out in arrival order: a FIFO semaphore counted in bytes.

Shell layer: trio and the standard library only; it knows nothing of frames,
connections or the engine. The server uses one for the memory of requests read
but not yet answered plus replies not yet sent, over all connections.

Invariants:

- ``used_bytes`` is what was acquired or charged and not yet released; it goes
  over ``limit_bytes`` only through ``charge`` (bytes that already exist).
- Waiters are granted strictly in arrival order: a later, smaller request never
  overtakes an earlier, larger one, so a stream of small requests cannot starve
  a large one. Several waiters may be granted by one release.
- A request larger than the whole budget is capped at the limit, so it is
  admitted once nothing else holds any.
- A waiter cancelled in the queue leaves it (those behind may then fit); one
  cancelled just after being granted gives its grant back.
"""

from __future__ import annotations

from collections import deque

import trio

__all__ = ["ByteBudget"]


class ByteBudget:
    """A budget of ``limit_bytes``, handed out in arrival order.

    ``acquire(n)`` waits while ``n`` more would pass the limit, and behind any earlier
    waiter (so a large request is not overtaken for ever by a stream of small ones). A
    request larger than the whole budget is admitted when nothing else holds any.
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.used_bytes = 0
        self._queue: deque[_BudgetWaiter] = deque()

    def _fits(self, size_bytes: int) -> bool:
        return not self.used_bytes or self.used_bytes + size_bytes <= self.limit_bytes

    async def acquire(self, size_bytes: int) -> int:
        """Take ``size_bytes`` (capped at the limit); returns what to ``release``."""
        size_bytes = min(size_bytes, self.limit_bytes)
        if not self._queue and self._fits(size_bytes):
            self.used_bytes += size_bytes
            return size_bytes
        waiter = _BudgetWaiter(size_bytes)
        self._queue.append(waiter)
        try:
            await waiter.granted.wait()
        except BaseException:
            if waiter.granted.is_set():
                self.release(size_bytes)  # granted just as we were cancelled
            else:
                self._queue.remove(waiter)
                self._grant()  # the waiters behind may fit now
            raise
        return size_bytes

    def _grant(self) -> None:
        while self._queue and self._fits(self._queue[0].size_bytes):
            waiter = self._queue.popleft()
            self.used_bytes += waiter.size_bytes
            waiter.granted.set()

    def charge(self, size_bytes: int) -> None:
        """Take ``size_bytes`` without waiting, even past the limit (replies already
        built): readers then wait until enough is released."""
        self.used_bytes += size_bytes

    def release(self, size_bytes: int) -> None:
        """Give back what ``acquire`` returned or ``charge`` took; wakes waiters that fit."""
        if size_bytes:
            self.used_bytes -= size_bytes
            self._grant()


class _BudgetWaiter:
    __slots__ = ("granted", "size_bytes")

    def __init__(self, size_bytes: int) -> None:
        self.size_bytes = size_bytes
        self.granted = trio.Event()
