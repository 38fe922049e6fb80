"""The runtime's internal messages: requests to the WAL writer, work for shard actors,
and the tickets that carry each answer back to the caller waiting for it.

Runtime layer: trio (a ticket's event) and domain types. Rules of this file:

1. One message type per request kind, each with only the fields that kind needs;
   receivers dispatch with ``match`` on the type, never on a tuple position.
2. Messages travel once per request and shard (a batch, a query, a limit change),
   never once per event: the per-event work stays in the domain's hot loops.
   Plain ``slots`` dataclasses, not frozen ones, because building a frozen one costs
   about three times as much and nothing here is shared after it is sent.
3. A ticket is completed exactly once, by the task named on its class (``fail``
   after completion is ignored, so a late failure never overwrites an answer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, Literal, NamedTuple, TypeVar

import trio

from engine.domain.batch import ShardSlice
from engine.domain.limits import Crossing, LimitDef, UsageChange
from engine.domain.meters import MeterDef
from engine.domain.query import QueryPlan
from engine.domain.records import CorrectedMinutes
from engine.schema import Alert, Customer

T = TypeVar("T")

# ------------------------------------------------------------------- tickets


class Ticket:
    """Completion of one request: the caller waits, another task answers."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: BaseException | None = None

    def finish(self) -> None:
        self.done.set()

    def fail(self, error: BaseException) -> None:
        if self.done.is_set():
            return  # already answered
        self.error = error
        self.done.set()

    async def wait(self) -> None:
        await self.done.wait()
        if self.error is not None:
            raise self.error


class LoggedTicket(Ticket):
    """A request that wrote one WAL record (a batch, a limit added or removed).

    The writer sets ``lsn`` and ``pending`` (how many shards have work for it); each
    shard actor adds its counts and crossings and decrements ``pending``; whoever
    brings it to zero hands the ticket to the ``AckSequencer``, which numbers its
    alerts and finishes tickets strictly in lsn order.
    """

    __slots__ = ("accepted", "alerts", "crossings", "duplicates", "extension", "feed", "lsn",
                 "pending", "received_ms", "removed")

    def __init__(self, received_ms: int) -> None:
        super().__init__()
        self.received_ms = received_ms
        self.lsn = 0
        self.pending = 0
        self.accepted = 0
        self.duplicates = 0
        self.crossings: list[tuple[int, list[Crossing]]] = []  # (shard, its crossings)
        self.alerts: list[Alert] = []
        self.removed = False  # a limit removal: whether the limit existed, in log order
        # For the extension (engine.runtime.extensions): the record's own actions, and
        # the usage feed the shards published while applying it.
        self.extension: list[Any] = []
        self.feed: list[UsageChange] = []


class GatherTicket(Ticket, Generic[T]):
    """Answers from several shard actors (query partials, snapshot parts): done when
    the last of ``pending`` shards answered."""

    __slots__ = ("pending", "results")

    def __init__(self, pending: int) -> None:
        super().__init__()
        self.pending = pending
        self.results: list[T] = []

    def add(self, result: T) -> None:
        self.results.append(result)
        self.pending -= 1
        if self.pending == 0:
            self.finish()


class SnapshotTicket(Ticket):
    """A snapshot: answered by the writer with the lsn the snapshot covers."""

    __slots__ = ("lsn",)

    def __init__(self) -> None:
        super().__init__()
        self.lsn = 0


# --------------------------------------------------------- work for a shard


@dataclass(slots=True, eq=False)
class ApplySlice:
    """A shard's share of one batch: its events grouped by meter."""

    slice: ShardSlice


@dataclass(slots=True, eq=False)
class InstallLimit:
    """Install (or replace) a limit and evaluate it for the period containing ``received_ms``."""

    limit: LimitDef
    received_ms: int


@dataclass(slots=True, eq=False)
class DropLimit:
    limit_id: str


@dataclass(slots=True, eq=False)
class ApplyCorrection:
    """A correction's rebuilt head minutes of one meter for one shard's customers."""

    meter: MeterDef
    changes: list[CorrectedMinutes]


ShardWork = ApplySlice | InstallLimit | DropLimit | ApplyCorrection


class Apply(NamedTuple):
    """One WAL record's work for one shard (a tuple: the cheapest typed record)."""

    lsn: int
    work: ShardWork
    ticket: LoggedTicket


@dataclass(slots=True, eq=False)
class ApplyGroup:
    """Everything one group commit gives one shard, in lsn order."""

    items: list[Apply]


# Partial aggregates of one shard for a query: (span index, group key) -> partial.
Partials = dict[tuple[int, tuple[Any, ...]], Any]


@dataclass(slots=True, eq=False)
class RunQuery:
    plan: QueryPlan
    ticket: GatherTicket[Partials]


@dataclass(slots=True, eq=False)
class ExportState:
    """Checkpoint this shard: seal the days before ``seal_before_minute`` into blocks
    (covering ``lsn``, the last lsn the writer handed out; with ``seal`` False only if
    that cuts nothing, i.e. its head begins there or later), merge its deltas into
    their blocks, then encode its part and the head's changed hour chunks (every
    chunk with ``full``; ``engine.domain.head``): answers a ``ShardCheckpoint``."""

    ticket: GatherTicket[ShardCheckpoint]
    seal_before_minute: int = 0
    lsn: int = 0
    full: bool = False
    seal: bool = True
    compact: bool = True  # merge deltas into their blocks (see ``WalWriter._snapshot``)


@dataclass(slots=True, eq=False)
class SealDays:
    """Seal this shard's days before ``seal_before_minute`` into blocks (covering
    ``lsn``) and, with ``compact``, merge its deltas into their blocks: between
    checkpoints, one shard at a time, so that no checkpoint (and no ack waiting behind
    one) carries a day's sealing. The blocks stay pinned in the cache until the next
    checkpoint writes them with the head that no longer holds their buckets. ``done``
    is set when the shard has finished (or failed, which stops the engine)."""

    done: trio.Event
    seal_before_minute: int
    lsn: int
    compact: bool


@dataclass(slots=True, eq=False)
class ShardCheckpoint:
    """One shard's share of a checkpoint: its encoded part, the head chunks to put
    (key, encoded), the chunk keys to delete, and where its sealed history ends now."""

    index: int
    part: bytes
    head: list[tuple[bytes, bytes]]
    drop_head: list[bytes]
    sealed_before_minute: int


@dataclass(slots=True, eq=False)
class FindCustomers:
    """Which customers have usage on this shard (of ``ids``, or all): answers a set."""

    ids: list[str] | None
    ticket: GatherTicket[set[str]]


@dataclass(slots=True, eq=False)
class FindDimensionKeys:
    """The dimension keys of a meter's series with usage in [start, end) on this shard
    (of ``customers``, or all): answers a set."""

    meter: MeterDef
    start_ms: int
    end_ms: int
    customers: frozenset[str] | None
    ticket: GatherTicket[set[str]]


ShardMessage = (ApplyGroup | RunQuery | ExportState | SealDays | FindCustomers
                | FindDimensionKeys)


# ------------------------------------------------------ requests to the writer


@dataclass(slots=True, eq=False)
class LogBatch:
    """Log an ingested batch, then give each shard its slice (``None``: nothing for it)."""

    ticket: LoggedTicket
    record: bytes
    work: list[ApplySlice | None]


@dataclass(slots=True, eq=False)
class LogLimitChange:
    """Log a limit added or removed; the catalog changes in commit order, and every
    shard gets the same ``change``."""

    ticket: LoggedTicket
    record: bytes
    change: InstallLimit | DropLimit


@dataclass(slots=True, eq=False)
class DefineMeter:
    """Store a meter definition; settled against concurrent ones in commit order."""

    ticket: Ticket
    meter: MeterDef
    key: bytes
    value: bytes


@dataclass(slots=True, eq=False)
class PutCustomer:
    """Store ``customer`` as its registry record. ``mode`` says what the caller asked:
    an ``add`` is refused if a named record exists, an ``update`` if the customer is
    unknown (``known_by_usage``: the caller saw usage for it)."""

    customer: Customer
    mode: Literal["add", "update"]
    known_by_usage: bool


@dataclass(slots=True, eq=False)
class HideCustomer:
    customer_id: str


@dataclass(slots=True, eq=False)
class LogCustomerChange:
    """Log a registry change; settled against concurrent ones in commit order."""

    ticket: LoggedTicket
    record: bytes
    change: PutCustomer | HideCustomer


@dataclass(slots=True, eq=False)
class LogExtension:
    """Log an extension's record (``engine.runtime.extensions``); the extension applies
    ``action`` in commit order and may answer shard work for every shard."""

    ticket: LoggedTicket
    record: bytes
    action: Any


@dataclass(slots=True, eq=False)
class TakeSnapshot:
    ticket: SnapshotTicket


@dataclass(slots=True, eq=False)
class LogCorrection:
    """Log a correction (``engine.runtime.corrections``). The writer commits it in a group
    of its own: it first brings ``pending`` up to the last committed lsn (the events
    logged since its scan), on a worker thread, then logs the record it builds."""

    ticket: LoggedTicket
    pending: Any  # engine.runtime.corrections.PendingCorrection


WriteRequest = (LogBatch | LogLimitChange | LogCustomerChange | LogExtension | DefineMeter
                | TakeSnapshot | LogCorrection)
