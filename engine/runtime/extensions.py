"""The seam through which an extension (pricing) rides on metering, which never imports it.

Runtime layer: domain types and the runtime's messages only. Metering defines
the seam; pricing (``engine.pricing.extension``) implements it, and the engine
is handed one at construction (``Engine(extension=...)``). The extension sees
two orders, and nothing else of the engine's state:

- **commit order** (``commit``): the WAL writer calls it for each of the
  extension's records right after the transaction that logged it, and recovery
  during replay. It may answer shard work (usage feeds to install or drop,
  ``engine.domain.limits.usage_feed``), which every shard applies in log order.
- **acknowledgement order** (``acknowledge``): for every WAL record, when it is
  acknowledged (and on replay, in the same order), with the record's own
  extension actions and the per-batch usage feed the shards published (the
  changed (feed, customer, period) usages). It answers crossings, numbered as
  alerts with the record's own, so they are pushed, stored and resumable by seq
  exactly like usage limits' alerts.

Both are deterministic functions of the log, so replay gives the same state and
the same alerts. ``export``/``restore`` carry the extension's state through a
snapshot (``EngineState.extension``).
"""

from __future__ import annotations

from typing import Any, Protocol

from engine.domain import records
from engine.domain.limits import Crossing, LimitDef
from engine.domain.meters import MeterDef
from engine.runtime.messages import LoggedTicket, ShardWork
from engine.schema import Limit


class Extension(Protocol):
    def decode(self, record: records.WalRecord) -> Any | None:
        """The extension's action for a logged record, or None if it is not its own."""
        ...

    def commit(self, action: Any, received_ms: int,
               meters: dict[str, MeterDef]) -> list[ShardWork]:
        """Apply ``action`` in commit order; the shard work it needs (usage feeds)."""
        ...

    def acknowledge(self, actions: list[Any], feed: list[Any],
                    received_ms: int) -> list[Crossing]:
        """Apply a record's actions and usage feed in acknowledgement order; the crossings."""
        ...

    def feed_defs(self, meters: dict[str, MeterDef]) -> list[LimitDef]:
        """The usage feeds installed now (restored shards reinstall them)."""
        ...

    def limits(self) -> list[Limit]:
        """The limits the extension evaluates (cost limits)."""
        ...

    def export(self) -> bytes:
        ...

    def restore(self, raw: bytes) -> None:
        ...


def acknowledge(extension: Extension | None, ticket: LoggedTicket) -> None:
    """Add the extension's crossings for ``ticket``'s record (before its alerts are numbered)."""
    if extension is None or not (ticket.extension or ticket.feed):
        return
    found = extension.acknowledge(ticket.extension, ticket.feed, ticket.received_ms)
    if found:
        ticket.crossings.append((-1, found))
