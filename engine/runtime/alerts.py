"""The alert hub: the ordered alert log, its persistence, and subscriptions.

Runtime layer: trio, the storage layer and ``engine.schema``. The hub is
appended to by the ``AckSequencer`` (and by recovery's replay), its unstored
alerts are taken by the WAL writer, and subscriptions read it.

Alerts get their ``seq`` in write-ahead-log order (``runtime.acks``), so the
log is a deterministic function of the WAL: replay after a crash regenerates
the same alerts with the same seqs. The hub keeps the most recent alerts in
memory and hands new ones to the WAL writer, which stores them in its next
transaction (and always before a snapshot truncates the WAL).

A subscription holds no queue: it remembers the next seq it wants and reads
the log from there (memory, or the store for old seqs), then waits for the
hub to announce more. A slow subscriber therefore never slows ingestion and
never loses an alert; one that fell out of the in-memory window is counted as
lagged (``subscription.lagged``) and catches up from the store.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import trio

from engine.domain import records
from engine.schema import Alert
from engine.storage import Store

RECENT_ALERTS = 65_536
READ_CHUNK = 512


class AlertHub:
    def __init__(self, store: Store, recent: int = RECENT_ALERTS) -> None:
        self._store = store
        self._recent_limit = recent
        # Never trimmed past an alert that is not yet stored, so reads have no gaps.
        self._recent: deque[Alert] = deque()
        self.next_seq = 0  # the seq the next alert will get
        self._unpersisted: list[Alert] = []
        self._changed = trio.Event()

    # ------------------------------------------------------------- writing

    def restore(self, next_seq: int) -> None:
        """After recovery: the log continues at ``next_seq``; recent alerts come from the store."""
        self.next_seq = next_seq
        start = max(0, next_seq - self._recent_limit)
        raws = self._store.read_alerts(start, next_seq - start)
        self._recent.extend(a for a in map(records.decode_alert, raws) if a.seq < next_seq)

    def append(self, alerts: list[Alert]) -> None:
        """Add alerts whose seqs continue the log (``next_seq`` onwards), and wake readers."""
        if not alerts:
            return
        self._recent.extend(alerts)
        self._unpersisted.extend(alerts)
        self.next_seq = alerts[-1].seq + 1
        self._changed.set()
        self._changed = trio.Event()

    def take_unpersisted(self) -> list[tuple[int, bytes]]:
        """Alerts for the writer to store; then ``stored`` or ``give_back``."""
        alerts, self._unpersisted = self._unpersisted, []
        return [(a.seq, records.encode_alert(a)) for a in alerts]

    def stored(self) -> None:
        """The alerts taken were committed: memory may now forget the oldest."""
        oldest_unstored = self._unpersisted[0].seq if self._unpersisted else self.next_seq
        recent = self._recent
        while len(recent) > self._recent_limit and recent[0].seq < oldest_unstored:
            recent.popleft()

    def give_back(self, encoded: list[tuple[int, bytes]]) -> None:
        """A commit that should have stored these failed: store them next time."""
        self._unpersisted[:0] = [records.decode_alert(raw) for _, raw in encoded]

    # ------------------------------------------------------------- reading

    async def read(self, from_seq: int, max_count: int = READ_CHUNK) -> tuple[list[Alert], bool]:
        """Alerts from ``from_seq`` (at most ``max_count``); and whether the store was needed."""
        if from_seq >= self.next_seq:
            return [], False
        recent = self._recent
        if recent and from_seq >= recent[0].seq:
            offset = from_seq - recent[0].seq
            return [recent[i] for i in range(offset, min(len(recent), offset + max_count))], False
        # A short read transaction, on this thread (see runtime.writer.call_store for why).
        raws = self._store.read_alerts(from_seq, max_count)
        await trio.lowlevel.checkpoint()
        alerts = [records.decode_alert(raw) for raw in raws]
        # Alerts not yet persisted are in memory; the store may also hold later ones.
        return [a for a in alerts if a.seq < self.next_seq], True

    async def wait_beyond(self, seq: int) -> None:
        """Return once an alert with seq >= ``seq`` exists."""
        while self.next_seq <= seq:
            await self._changed.wait()


class AlertSubscription:
    """Alerts from ``from_seq`` on: first the stored ones, then live ones, none twice."""

    def __init__(self, hub: AlertHub, from_seq: int) -> None:
        self._hub = hub
        self.next_seq = max(0, from_seq)
        self.lagged = 0  # times this subscriber had to catch up from the store
        self._buffer: deque[Alert] = deque()

    def __aiter__(self) -> AsyncIterator[Alert]:
        return self

    async def __anext__(self) -> Alert:
        while not self._buffer:
            await self._hub.wait_beyond(self.next_seq)
            alerts, from_store = await self._hub.read(self.next_seq)
            if from_store:
                self.lagged += 1
            self._buffer.extend(alerts)
            if not alerts:
                await trio.lowlevel.checkpoint()
        alert = self._buffer.popleft()
        self.next_seq = alert.seq + 1
        return alert

    async def receive_batch(self, max_count: int = READ_CHUNK) -> list[Alert]:
        """The next alerts available (at least one), for pushing many at once."""
        if not self._buffer:
            first = await self.__anext__()
            batch = [first]
        else:
            batch = []
        while self._buffer and len(batch) < max_count:
            alert = self._buffer.popleft()
            self.next_seq = alert.seq + 1
            batch.append(alert)
        return batch

    def behind_by(self) -> int:
        return self._hub.next_seq - self.next_seq


def alert_from_crossing(seq: int, crossing: tuple[Any, ...], crossed_at_ms: int) -> Alert:
    limit_id, customer, meter, threshold, value, period_start = crossing[:6]
    if len(crossing) == 8:  # a cost limit's (pricing's): measure and currency
        return Alert(seq=seq, limit_id=limit_id, customer_id=customer, meter_api_name=meter,
                     threshold=threshold, value=value, period_start_ms=period_start,
                     crossed_at_ms=crossed_at_ms, measure=crossing[6], currency=crossing[7])
    return Alert(seq=seq, limit_id=limit_id, customer_id=customer, meter_api_name=meter,
                 threshold=threshold, value=value, period_start_ms=period_start,
                 crossed_at_ms=crossed_at_ms)
