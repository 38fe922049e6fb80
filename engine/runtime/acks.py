"""Acknowledgement order and alert numbering.

Runtime layer: the alert hub and the runtime's messages; never the store. The
``AckSequencer`` owns the finished-but-not-yet-acknowledged tickets and the next
lsn to acknowledge. Shard actors (and the writer, for records no shard works
on) hand it a ticket once every shard applied its share; it acknowledges
tickets strictly in lsn order, numbering each record's alerts as it goes, so
alert seqs follow the log and never the order in which shards finished.
"""

from __future__ import annotations

from engine.domain.limits import Crossing
from engine.runtime.alerts import AlertHub, alert_from_crossing
from engine.runtime.extensions import Extension, acknowledge
from engine.runtime.messages import LoggedTicket
from engine.schema import Alert


def number_alerts(crossings: list[tuple[int, list[Crossing]]], first_seq: int,
                  received_ms: int) -> list[Alert]:
    """A record's alerts, numbered from ``first_seq`` in an order that depends only on the log.

    Sorted by (customer, limit, period start, threshold): independent of the shard
    count and of how state was rebuilt, so replay after a crash, even with another
    shard count, gives every alert the seq it was acknowledged with.
    """
    ordered = sorted(
        (crossing for _, found in crossings for crossing in found),
        key=lambda c: (c[1], c[0], c[5], c[3]),
    )
    return [alert_from_crossing(first_seq + offset, crossing, received_ms)
            for offset, crossing in enumerate(ordered)]


class AckSequencer:
    def __init__(self, hub: AlertHub, next_lsn: int, extension: Extension | None = None) -> None:
        self._hub = hub
        self._extension = extension
        self._next_lsn = next_lsn
        self._finished: dict[int, LoggedTicket] = {}

    def finish(self, ticket: LoggedTicket) -> None:
        """Every shard applied ``ticket``'s record: acknowledge it and all before it, in order."""
        self._finished[ticket.lsn] = ticket
        while self._next_lsn in self._finished:
            done = self._finished.pop(self._next_lsn)
            self._next_lsn += 1
            acknowledge(self._extension, done)
            done.alerts = number_alerts(done.crossings, self._hub.next_seq, done.received_ms)
            self._hub.append(done.alerts)
            done.finish()

    @property
    def next_lsn(self) -> int:
        """The lsn the next acknowledgement will be for."""
        return self._next_lsn
