"""The batcher: single events in, batches out, over one client connection at a time.

Shell layer: trio, ``engine.client`` and the schema. ``open_batcher`` buffers
events, flushes by size, by interval and on exit, and on a lost connection
reconnects and resends the same batch: every event has a unique id (one is
given if missing), so a resend after a lost acknowledgement is counted as a
duplicate by the server, never twice. One flush runs at a time.
"""

from __future__ import annotations

import logging
import ssl
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import msgspec
import trio

from engine.client import Client, open_client
from engine.errors import ConnectionLost, ServerBusy
from engine.runtime.groups import unwrap_single
from engine.schema import Event, IngestAck

__all__ = ["Batcher", "BatcherStatistics", "open_batcher"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BatcherStatistics:
    """What ``Batcher.statistics()`` returns: counters at the moment of the call.

    ``Batcher.statistics`` used to be a (mutable) attribute, so the record is also
    callable: ``batcher.statistics.accepted`` and ``batcher.statistics().accepted`` read
    the same value. New code should call it.
    """

    events_added: int = 0
    """Events given to ``add``."""
    batches_sent: int = 0
    """Batches acknowledged by the server."""
    accepted: int = 0
    """Events the server accepted (not duplicates)."""
    duplicates: int = 0
    """Events the server had already (a retry after a lost acknowledgement, say)."""
    retries: int = 0
    """Sends repeated after a lost connection."""

    def __call__(self) -> BatcherStatistics:
        return self


@dataclass(slots=True)
class _BatcherCounters:
    events_added: int = 0
    batches_sent: int = 0
    accepted: int = 0
    duplicates: int = 0
    retries: int = 0


class Batcher:
    """Buffers events and sends them in batches; see ``open_batcher``."""

    def __init__(self, host: str, port: int, api_key: str | None, max_events: int,
                 max_retries: int, retry_backoff_s: float,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self._address = (host, port, api_key)
        self._ssl_context = ssl_context
        self.max_events = max_events
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        self._counters = _BatcherCounters()
        self._buffer: list[Event] = []
        self._client: Client | None = None
        self._client_scope: Any = None
        self._lock = trio.Lock()
        self._nursery: trio.Nursery | None = None

    @property
    def statistics(self) -> BatcherStatistics:
        """``batcher.statistics()`` (or, as before, ``batcher.statistics.accepted``)."""
        counters = self._counters
        return BatcherStatistics(
            events_added=counters.events_added, batches_sent=counters.batches_sent,
            accepted=counters.accepted, duplicates=counters.duplicates,
            retries=counters.retries)

    async def add(self, event: Event) -> None:
        """Buffer one event (giving it a unique id if it has none); flush when full."""
        if event.unique_id is None:
            event = msgspec.structs.replace(event, unique_id=uuid.uuid4().hex)
        self._buffer.append(event)
        self._counters.events_added += 1
        if len(self._buffer) >= self.max_events:
            await self.flush()

    async def flush(self) -> IngestAck | None:
        """Send what is buffered now; retries on connection loss with the same unique ids."""
        async with self._lock:
            if not self._buffer:
                return None
            batch, self._buffer = self._buffer, []
            ack = await self._send_with_retries(batch)
            self._counters.batches_sent += 1
            self._counters.accepted += ack.accepted
            self._counters.duplicates += ack.duplicates
            return ack

    async def _send_with_retries(self, batch: list[Event]) -> IngestAck:
        attempt = 0
        while True:
            try:
                client = await self._connected()
                return await client.ingest(batch)
            except (ConnectionLost, ServerBusy, OSError, trio.TooSlowError,
                    trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                await self._disconnect()
                attempt += 1
                if attempt > self.max_retries:
                    raise ConnectionLost(f"gave up after {attempt} attempts: {exc}") from None
                self._counters.retries += 1
                log.info("ingest failed (%s); retry %d with the same unique ids", exc, attempt)
                await trio.sleep(self.retry_backoff_s * min(2 ** (attempt - 1), 32))

    async def _connected(self) -> Client:
        if self._client is not None:
            return self._client
        assert self._nursery is not None
        host, port, api_key = self._address
        self._client = await self._nursery.start(self._hold_client, host, port, api_key)
        return self._client

    async def _hold_client(self, host: str, port: int, api_key: str | None,
                           task_status: trio.TaskStatus[Client]) -> None:
        with trio.CancelScope() as scope:
            self._client_scope = scope
            async with open_client(host, port, api_key,
                                   ssl_context=self._ssl_context) as client:
                task_status.started(client)
                await trio.sleep_forever()

    async def _disconnect(self) -> None:
        if self._client_scope is not None:
            self._client_scope.cancel()
        self._client = None
        self._client_scope = None
        await trio.lowlevel.checkpoint()


@asynccontextmanager
async def open_batcher(
    host: str,
    port: int,
    api_key: str | None = None,
    *,
    max_events: int = 1000,
    flush_interval_s: float = 1.0,
    max_retries: int = 8,
    retry_backoff_s: float = 0.1,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[Batcher]:
    """A ``Batcher``: ``await batcher.add(event)``; flushed by size, every interval, and on exit.

    ``ssl_context``: connect over TLS (as ``open_client``)."""
    batcher = Batcher(host, port, api_key, max_events, max_retries, retry_backoff_s,
                      ssl_context)
    with unwrap_single():
        async with trio.open_nursery() as nursery:
            batcher._nursery = nursery

            async def flush_periodically() -> None:
                while True:
                    await trio.sleep(flush_interval_s)
                    await batcher.flush()

            nursery.start_soon(flush_periodically)
            try:
                yield batcher
                await batcher.flush()
            finally:
                nursery.cancel_scope.cancel()


