"""A seeded, reproducible ingest workload for the benchmarks.

Benchmark support code: imports the standard library, msgspec and the public
``engine`` types only. ``generate(seed, ...)`` is a pure function of its
arguments (``random.Random(seed)``, a fixed default ``now_ms``), so two runs
with the same arguments produce byte-identical batches.

Shape of the traffic:

- ``meters`` meter definitions whose aggregations cycle through
  ``aggregations`` (``("sum", "count")`` for the headline run).
- Customers drawn from a Zipf distribution (exponent ``zipf_s``, rank 1 the
  most active) through a precomputed cumulative table and ``bisect``.
- Meter ``i`` carries a fixed set of 0 to 3 dimension keys (cycling
  ``[]``, ``[region]``, ``[region, endpoint]``, ``[region, plan, endpoint]``):
  ``region`` and ``plan`` are properties of the customer, ``endpoint`` varies
  per event, so a (meter, customer) has at most a handful of series, as in
  real usage data. ``unique_count`` meters also carry a ``user`` dimension.
- Time advances through the batches from ``now - days`` to ``now``; inside a
  batch events are in time order, except ~``late_fraction`` of them that are
  older than the batch's time by up to 30 days (never older than
  ``now - 34 days``, inside the engine's 35-day late limit).
- ~``duplicate_fraction`` of events are retries: an exact copy of a recent
  earlier event (same meter, customer, time, value, dimensions and
  ``unique_id``). Every other event has its own unique id. The engine must
  count exactly ``expected_duplicates`` duplicates, whatever the order in
  which concurrent batches reach it.

``WorkloadStream`` yields the same batches one at a time, for workloads too big
to hold in memory; ``generate`` collects a stream, so the two agree exactly.
"""

from __future__ import annotations

import random
import uuid
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import accumulate

import msgspec

from engine import Event, Meter

MINUTE_MS = 60_000
DAY_MS = 86_400_000
# 2025-06-15T00:00:00Z: a fixed default so the workload depends on the seed only.
DEFAULT_NOW_MS = 1_749_945_600_000
MAX_LATE_MS = 30 * DAY_MS
OLDEST_AGE_MS = 34 * DAY_MS  # the engine accepts up to 35 days; keep a day of margin
RETRY_WINDOW = 5_000  # a duplicate copies one of the last this-many original events

REGIONS = ("us-east", "us-west", "eu-west", "eu-central", "ap-south", "ap-northeast")
PLANS = ("free", "starter", "pro", "enterprise")
ENDPOINTS = (
    "/v1/search", "/v1/items", "/v1/items/{id}", "/v1/orders", "/v1/users",
    "/v1/embeddings", "/v1/chat", "/v1/files",
)
USERS = tuple(f"user-{n:03d}" for n in range(200))
DIMENSION_SETS: tuple[tuple[str, ...], ...] = (
    (),
    ("region",),
    ("region", "endpoint"),
    ("region", "plan", "endpoint"),
)
UNIQUE_DIMENSION = "user"
# All seven aggregations, ordered so that every prefix is at least half sum/count.
AGGREGATIONS_MIXED = (
    "sum", "count", "max", "sum", "unique_count", "count", "latest", "sum", "avg", "count", "min",
)


@dataclass(frozen=True)
class Workload:
    """Everything a benchmark needs to replay the same traffic."""

    seed: int
    now_ms: int
    meters: list[Meter]
    batches: list[list[Event]]
    encoded: list[bytes]  # msgspec.msgpack.encode(batch) for each batch
    event_count: int
    expected_duplicates: int
    customer_ids: list[str]  # by Zipf rank: customer_ids[0] is the most active
    parameters: dict[str, object] = field(default_factory=dict)

    @property
    def expected_accepted(self) -> int:
        return self.event_count - self.expected_duplicates

    @property
    def encoded_bytes(self) -> int:
        return sum(len(raw) for raw in self.encoded)


def meter_dimension_keys(index: int, max_dimensions: int) -> tuple[str, ...]:
    """The dimension keys meter ``index`` carries (``unique_count`` meters add ``user``)."""
    return DIMENSION_SETS[index % (max_dimensions + 1)]


def zipf_cumulative(count: int, s: float) -> list[float]:
    """Cumulative weights of ranks 1..count under Zipf(s); ``s=0`` is uniform."""
    return list(accumulate(1.0 / rank**s for rank in range(1, count + 1)))


def meter_definitions(count: int, aggregations: Sequence[str]) -> list[Meter]:
    if not aggregations:
        raise ValueError("aggregations must name at least one aggregation")
    meters = []
    for index in range(count):
        aggregation = aggregations[index % len(aggregations)]
        meters.append(Meter(
            name=f"meter_{index}_{aggregation}",
            aggregation=aggregation,  # type: ignore[arg-type]
            unique_dimension=UNIQUE_DIMENSION if aggregation == "unique_count" else None,
        ))
    return meters


class WorkloadStream:
    """The batches of a workload, generated one at a time (bounded memory).

    ``batches()`` yields each batch once; ``duplicates`` and ``produced`` count
    what has been yielded so far, so after the last batch they are the totals
    that ``generate`` reports. Used where a workload is too big to hold (the
    10M-event recovery state); ``generate`` is this stream, collected.
    """

    def __init__(
        self,
        seed: int,
        *,
        customers: int = 10_000,
        meters: int = 5,
        events: int = 200_000,
        batch_size: int = 1000,
        days: float = 30,
        duplicate_fraction: float = 0.01,
        late_fraction: float = 0.05,
        now_ms: int = DEFAULT_NOW_MS,
        aggregations: Sequence[str] = ("sum", "count"),
        zipf_s: float = 1.1,
        max_dimensions: int = 3,
        unique_ids: bool = True,
    ) -> None:
        if customers < 1 or meters < 1 or events < 0 or batch_size < 1:
            raise ValueError("customers, meters and batch_size must be positive, events >= 0")
        if not 0 <= duplicate_fraction < 1 or not 0 <= late_fraction < 1:
            raise ValueError("duplicate_fraction and late_fraction must be in [0, 1)")
        if not 0 < days * DAY_MS <= OLDEST_AGE_MS:
            raise ValueError("days must be positive and at most 34")
        if not 0 <= max_dimensions <= 3:
            raise ValueError("max_dimensions must be from 0 to 3")
        self.seed = seed
        self.now_ms = now_ms
        self.events = events
        self.batch_size = batch_size
        self._rng = random.Random(seed)
        self.meters = meter_definitions(meters, aggregations)
        self.customer_ids = [f"customer-{rank:06d}" for rank in range(1, customers + 1)]
        self._customer_region = [self._rng.choice(REGIONS) for _ in range(customers)]
        self._customer_plan = [self._rng.choice(PLANS) for _ in range(customers)]
        self._cumulative = zipf_cumulative(customers, zipf_s)
        self._days = days
        self._late_fraction = late_fraction
        self._max_dimensions = max_dimensions
        self._unique_ids = unique_ids
        self._duplicate_fraction = 0.0 if not unique_ids else duplicate_fraction
        self.duplicates = 0
        self.produced = 0
        self._started = False
        self.parameters: dict[str, object] = {
            "customers": customers, "meters": meters, "events": events,
            "batch_size": batch_size, "days": days,
            "duplicate_fraction": self._duplicate_fraction, "late_fraction": late_fraction,
            "now_ms": now_ms, "aggregations": list(aggregations), "zipf_s": zipf_s,
            "max_dimensions": max_dimensions, "unique_ids": unique_ids,
        }

    @property
    def batch_count(self) -> int:
        return (self.events + self.batch_size - 1) // self.batch_size

    def batches(self) -> Iterator[list[Event]]:
        """Yield the batches in order; a stream can be consumed once."""
        if self._started:
            raise RuntimeError("a WorkloadStream yields its batches once")
        self._started = True
        rng = self._rng
        meters = len(self.meters)
        kinds = [m.aggregation for m in self.meters]
        names = [m.name for m in self.meters]
        dimension_sets = [meter_dimension_keys(i, self._max_dimensions) for i in range(meters)]
        customer_ids = self.customer_ids
        customer_region = self._customer_region
        customer_plan = self._customer_plan
        cumulative = self._cumulative
        total_weight = cumulative[-1]
        last_rank = len(customer_ids) - 1
        id_prefix = rng.getrandbits(64) << 64  # ids are unique by construction: prefix | counter
        unique_ids = self._unique_ids
        duplicate_fraction = self._duplicate_fraction
        late_fraction = self._late_fraction
        now_ms = self.now_ms
        start_ms = now_ms - int(self._days * DAY_MS)
        oldest_ms = now_ms - OLDEST_AGE_MS
        span_ms = now_ms - start_ms
        events = self.events
        batch_size = self.batch_size
        batch_count = self.batch_count
        recent: list[Event] = []  # ring of recent originals that a retry may copy
        originals = 0
        for batch_index in range(batch_count):
            produced = self.produced
            size = min(batch_size, events - produced)
            # In-order events of this batch fall in its slice of the time span, sorted.
            slice_low = start_ms + span_ms * batch_index // batch_count
            slice_high = start_ms + span_ms * (batch_index + 1) // batch_count
            times = sorted(rng.randrange(slice_low, max(slice_high, slice_low + 1))
                           for _ in range(size))
            batch: list[Event] = []
            for position in range(size):
                if recent and rng.random() < duplicate_fraction:
                    batch.append(recent[rng.randrange(len(recent))])
                    self.duplicates += 1
                    continue
                ts = times[position]
                if rng.random() < late_fraction:
                    ts = max(oldest_ms, slice_high - rng.randrange(MINUTE_MS, MAX_LATE_MS))
                rank = min(bisect_right(cumulative, rng.random() * total_weight), last_rank)
                meter_index = rng.randrange(meters)
                kind = kinds[meter_index]
                dims: dict[str, str] = {}
                for key in dimension_sets[meter_index]:
                    if key == "region":
                        dims[key] = customer_region[rank]
                    elif key == "plan":
                        dims[key] = customer_plan[rank]
                    else:
                        dims[key] = ENDPOINTS[min(int(rng.expovariate(0.6)), len(ENDPOINTS) - 1)]
                if kind == "unique_count":
                    dims[UNIQUE_DIMENSION] = rng.choice(USERS)
                value = 1 if kind == "count" else rng.randint(1, 1000)
                unique_id = (
                    str(uuid.UUID(int=id_prefix | (produced + position))) if unique_ids else None
                )
                event = Event(
                    meter_api_name=names[meter_index],
                    customer_id=customer_ids[rank],
                    meter_value=value,
                    meter_time_in_millis=ts,
                    dimensions=dims,
                    unique_id=unique_id,
                )
                batch.append(event)
                if unique_ids:
                    if len(recent) < RETRY_WINDOW:
                        recent.append(event)
                    else:
                        recent[originals % RETRY_WINDOW] = event
                    originals += 1
            self.produced = produced + size
            yield batch


def generate(
    seed: int,
    *,
    customers: int = 10_000,
    meters: int = 5,
    events: int = 200_000,
    batch_size: int = 1000,
    days: float = 30,
    duplicate_fraction: float = 0.01,
    late_fraction: float = 0.05,
    now_ms: int = DEFAULT_NOW_MS,
    aggregations: Sequence[str] = ("sum", "count"),
    zipf_s: float = 1.1,
    max_dimensions: int = 3,
    unique_ids: bool = True,
) -> Workload:
    """Build a reproducible workload of ``events`` events in batches of ``batch_size``.

    ``unique_ids=False`` sends events without unique ids (and so without
    duplicates): used to measure bucket memory without the dedup index.
    """
    stream = WorkloadStream(
        seed, customers=customers, meters=meters, events=events, batch_size=batch_size,
        days=days, duplicate_fraction=duplicate_fraction, late_fraction=late_fraction,
        now_ms=now_ms, aggregations=aggregations, zipf_s=zipf_s,
        max_dimensions=max_dimensions, unique_ids=unique_ids,
    )
    batches = list(stream.batches())
    encoder = msgspec.msgpack.Encoder()
    encoded = [encoder.encode(batch) for batch in batches]
    return Workload(
        seed=seed,
        now_ms=now_ms,
        meters=stream.meters,
        batches=batches,
        encoded=encoded,
        event_count=stream.produced,
        expected_duplicates=stream.duplicates,
        customer_ids=stream.customer_ids,
        parameters=stream.parameters,
    )
