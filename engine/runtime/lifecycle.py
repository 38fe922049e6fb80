"""Whether the engine takes requests, why it stopped, and who is still waiting.

Runtime layer: trio and ``engine.errors``. Owns ``closed``, ``failure`` and the set
of tickets callers wait on. ``close`` is called by the engine facade; ``stop``
by the WAL writer or a shard actor that hit an error it cannot recover from
(fail-stop). Every caller checks ``check_open`` before it submits, and when the
engine's tasks end ``fail_outstanding`` answers every ticket still waiting, so
nobody waits forever.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import trio

from engine.errors import EngineClosed, map_exceptions
from engine.runtime.messages import Ticket


def closed_channel_is_closed_engine() -> AbstractContextManager[None]:
    """A mailbox or the writer's queue closed under a sender: the engine is closed."""
    return map_exceptions({trio.ClosedResourceError: EngineClosed,
                           trio.BrokenResourceError: EngineClosed}, "the engine is closed")


class Lifecycle:
    def __init__(self) -> None:
        self.closed = False
        self.failure: BaseException | None = None
        self._outstanding: set[Ticket] = set()

    def close(self) -> None:
        self.closed = True

    def stop(self, error: BaseException) -> None:
        """A task failed in a way that leaves state unknown: refuse everything from now."""
        if self.failure is None:
            self.failure = error

    def check_open(self) -> None:
        if self.failure is not None:
            raise EngineClosed(f"the engine stopped after an internal error: {self.failure!r}")
        if self.closed:
            raise EngineClosed("the engine is closed")

    @contextmanager
    def waiting(self, ticket: Ticket) -> Iterator[None]:
        """While the body waits on ``ticket``: fail it if the engine stops first."""
        self._outstanding.add(ticket)
        try:
            yield
        finally:
            self._outstanding.discard(ticket)

    def fail_outstanding(self) -> None:
        closed = EngineClosed(f"the engine stopped: {self.failure!r}"
                              if self.failure else "the engine is closed")
        for ticket in list(self._outstanding):
            ticket.fail(closed)
