"""Property test: alerts fired for random event streams equal a naive model's.

The model keeps the list of accepted events; after each batch it recomputes,
from scratch, every (limit, customer, period) that the batch touched, and
fires each threshold reached that had not fired in that period.
"""

from __future__ import annotations

from collections import Counter
from decimal import Decimal, localcontext
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import Event, Limit, Meter, Query, open_engine
from engine.domain import records
from engine.domain.aggregates import finalize
from engine.domain.batch import ShardRouter, prepare_batch
from engine.domain.limits import TOTAL_END_MS, Crossing, LimitDef, check_limit, period_bounds
from engine.domain.meters import IngestRules, check_meter
from engine.domain.query import finish_query, plan_query
from engine.domain.shard import ShardState, restore_shards
from engine.domain.values import EXACT
from engine.runtime.dedup import batch_keys, drop_duplicates
from engine.runtime.shards import shard_part
from engine.storage import MemoryStore
from tests.helpers.events import DAY, HOUR, MINUTE
from tests.helpers.strategies import ANCHORS_MS, CUSTOMERS, METERS, ZONES, events, values
from tests.model import Model, ModelEvent, aggregate

limits_strategy = st.builds(
    Limit,
    id=st.sampled_from(["l1", "l2", "l3"]),
    meter_api_name=st.sampled_from([m.name for m in METERS]),
    thresholds=st.lists(
        st.one_of(st.integers(-5, 3 * 10**6), st.decimals(0, 10**5, places=2)),
        min_size=1, max_size=3,
    ),
    customer_id=st.one_of(st.none(), st.sampled_from(CUSTOMERS[:3])),
    period=st.sampled_from(["hour", "day", "week", "month", "total"]),
    timezone=st.sampled_from(ZONES),
    filter=st.one_of(st.just({}), st.just({"region": ["eu"]})),
)


class LimitModel:
    def __init__(self, model: Model) -> None:
        self.model = model
        self.limits: dict[str, Limit] = {}
        self.fired: set[tuple[str, str, int, Any]] = set()

    def matching(self, limit: Limit, item: ModelEvent) -> bool:
        event = item.event
        if event.meter_api_name != limit.meter_api_name:
            return False
        if limit.customer_id is not None and event.customer_id != limit.customer_id:
            return False
        return all(event.dimensions.get(k) in allowed for k, allowed in limit.filter.items())

    def usage(self, limit: Limit, customer: str, start: int, end: int) -> Any:
        """The customer's usage in [start, end) under the limit, or None if none."""
        meter = self.model.meters[limit.meter_api_name]
        items = [i for i in self.model.events if self.matching(limit, i)
                 and i.event.customer_id == customer
                 and start <= i.event.meter_time_in_millis < end]
        return aggregate(meter, items) if items else None

    def evaluate(self, limit: Limit, customer: str, start: int, end: int) -> list[tuple]:
        value = self.usage(limit, customer, start, end)
        if value is None:
            return []
        out = []
        thresholds = sorted({Decimal(repr(t)) if isinstance(t, float) else Decimal(t)
                             for t in limit.thresholds})
        for threshold in thresholds:
            key = (limit.id, customer, start, threshold)
            if value >= threshold and key not in self.fired:
                self.fired.add(key)
                out.append((limit.id, customer, threshold, value, start))
        return out

    def add(self, limit: Limit, now_ms: int) -> list[tuple]:
        self.limits.pop(limit.id, None)
        self.limits[limit.id] = limit
        self.fired = {k for k in self.fired if k[0] != limit.id}
        start, end = period_bounds(now_ms, limit)
        customers = {i.event.customer_id for i in self.model.events
                     if i.event.meter_api_name == limit.meter_api_name}
        out = []
        for customer in sorted(customers):
            if limit.customer_id in (None, customer):
                out += self.evaluate(limit, customer, start, end)
        return out

    def after_batch(self, accepted: list[ModelEvent]) -> list[tuple]:
        out = []
        for limit in self.limits.values():
            touched = {}
            for item in accepted:
                if self.matching(limit, item):
                    start, end = period_bounds(item.event.meter_time_in_millis, limit)
                    touched[(item.event.customer_id, start)] = end
            for (customer, start), end in touched.items():
                out += self.evaluate(limit, customer, start, end)
        return out


def as_keys(alerts: list[Any]) -> Counter:
    return Counter((a.limit_id, a.customer_id, Decimal(a.threshold), Decimal(a.value),
                    a.period_start_ms) for a in alerts)


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(anchor=st.sampled_from(ANCHORS_MS), data=st.data(), shards=st.integers(1, 4))
async def test_alerts_match_model(anchor: int, data: Any, shards: int) -> None:
    now = anchor + 3 * DAY
    model = Model(meters={m.name: m for m in METERS})
    limit_model = LimitModel(model)
    steps = data.draw(st.lists(st.one_of(
        st.tuples(st.just("batch"), st.lists(events(anchor), min_size=1, max_size=20)),
        st.tuples(st.just("limit"), limits_strategy),
    ), min_size=1, max_size=8))
    seq = 0
    async with open_engine(store=MemoryStore(), shards=shards, clock_ms=lambda: now) as eng:
        for meter in METERS:
            await eng.define_meter(meter)
        async with eng.subscribe(from_seq=0) as subscription:
            for kind, payload in steps:
                if kind == "limit":
                    await eng.add_limit(payload)
                    expected = limit_model.add(payload, now)
                    got = []
                    while subscription.next_seq < eng.next_alert_seq():
                        alert = await subscription.__anext__()
                        if alert.seq >= seq:  # earlier ones arrived in acks already
                            got.append(alert)
                else:
                    before = len(model.events)
                    model.ingest(payload)
                    expected = limit_model.after_batch(model.events[before:])
                    ack = await eng.ingest(payload, report_alerts=True)
                    got = ack.alerts
                assert [a.seq for a in got] == list(range(seq, seq + len(got)))
                seq += len(got)
                assert as_keys(got) == Counter(
                    (lid, c, Decimal(t), Decimal(v), s) for lid, c, t, v, s in expected
                ), (kind, payload)


# ------------------------------------------------- limit states, shard by shard
#
# The same model, against shard states driven directly (no engine, no store), over
# many periods: the received clock advances by up to days, events arrive up to the
# late limit behind it (late events into earlier periods), limits are added between
# batches, and the shards restart from a snapshot (with states, or as one written
# before states were kept). After every step each kept state equals the model's
# usage and a query's, and nothing older than the late limit is kept.

STATE_METERS = {m.name: check_meter(m, IngestRules()) for m in METERS}


def state_events(now_ms: int, late_ms: int) -> st.SearchStrategy[list[Event]]:
    def build(meter: Meter, customer: str, value: Any, age_ms: int, region: str | None,
              user: str, unique_id: str | None) -> Event:
        dims = {} if region is None else {"region": region}
        if meter.unique_dimension:
            dims["user"] = user
        return Event(meter.name, customer, value, now_ms - age_ms, dims, unique_id)

    one = st.builds(
        build, st.sampled_from(METERS), st.sampled_from(CUSTOMERS[:3]), values,
        st.one_of(st.integers(0, late_ms), st.integers(0, min(3 * HOUR, late_ms)),
                  st.sampled_from([0, MINUTE, late_ms])),  # equal times: latest's order
        st.sampled_from([None, "eu", "us"]), st.sampled_from(["u1", "u2", "u3"]),
        st.one_of(st.none(), st.sampled_from([f"id-{i}" for i in range(8)])),
    )
    return st.lists(one, min_size=1, max_size=12)


def restart(states: list[ShardState], route: ShardRouter, limit_defs: list[LimitDef],
            late_ms: int, mode: str, chunks: dict[tuple[int, str, int], bytes],
            ) -> list[ShardState]:
    """Snapshot and restore, as recovery does (the WAL tail replays through apply).

    ``mode``: "states" keeps every state in the parts (as stores from before chunks),
    "none" keeps none (read from the source on first touch), "chunks" keeps the
    unique_count limits' states as a checkpoint does: the chunks of what changed since
    the last one, in ``chunks`` (the store's, kept across restarts)."""
    canonical = [records.encode(shard_part(state)) for state in states]
    raw = []
    for index, state in enumerate(states):
        part = shard_part(state)
        if mode == "chunks":
            part.limit_states = state.alert_limits.export_states(unique=False)
            puts, drops = state.alert_limits.unique_chunks()
            for limit_id, seq in drops:
                del chunks[(index, limit_id, seq)]
            for limit_id, seq, payload in puts:
                chunks[(index, limit_id, seq)] = records.encode(payload)
        elif mode == "none":
            part.limit_states = []
        raw.append(records.encode(part))
    if mode != "chunks":
        chunks.clear()  # a store from before chunks has none
    parts = [records.decode_part(r) for r in raw]
    restored = restore_shards(parts, STATE_METERS, route, late_ms)
    fired = [entry for p in parts for entry in p.fired]
    kept = [entry for p in parts for entry in p.limit_states]
    stored = [(part, limit_id, seq, records.decode_limit_chunk(payload))
              for (part, limit_id, seq), payload in chunks.items()]
    for index, state in enumerate(restored):
        state.alert_limits.load(limit_defs, fired, route, index, kept)
        state.alert_limits.load_unique_chunks(stored, route, index)
    if mode != "none":  # restoring the states changes nothing
        assert [records.encode(shard_part(s)) for s in restored] == canonical
    return restored


def check_states(states: list[ShardState], limit_model: LimitModel, now_ms: int,
                 late_ms: int) -> None:
    forgotten_before = now_ms - late_ms - MINUTE - HOUR  # forgetting runs once an hour
    for state in states:
        limits = state.alert_limits
        for limit_id, periods in limits.states.items():
            limit = limits.by_id[limit_id]
            for start, period in periods.items():
                assert (start, period.end_ms) == period_bounds(start, limit.limit)
                assert period.end_ms > forgotten_before, "an ended period was kept"
                for customer, partial in period.partials.items():
                    expected = limit_model.usage(limit.limit, customer, start, period.end_ms)
                    with localcontext(EXACT):
                        usage = finalize(limit.meter.kind, partial)
                        if period.end_ms < TOTAL_END_MS:
                            filters = {**limit.limit.filter, "customer_id": [customer]}
                            plan = plan_query(Query(limit.meter.name, start, period.end_ms,
                                                    filter=filters), limit.meter)
                            rows = finish_query(plan, [s.query(plan) for s in states]).rows
                            assert [row.value for row in rows] == [usage]
                    assert usage == expected, (limit_id, customer, start)
            for _, start in limits.fired[limit_id]:
                end = period_bounds(start, limit.limit)[1]
                assert end > forgotten_before, "an ended period's fired mask was kept"


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(anchor=st.sampled_from(ANCHORS_MS), data=st.data(), shards=st.integers(1, 3),
       late_ms=st.sampled_from([2 * HOUR, DAY, 3 * DAY, 40 * DAY]))
def test_limit_states_match_model_across_periods_restarts_and_forgetting(
    anchor: int, data: Any, shards: int, late_ms: int,
) -> None:
    model = Model(meters={m.name: m for m in METERS})
    limit_model = LimitModel(model)
    route = ShardRouter(shards)
    seen_ids: set[bytes] = set()  # the unique ids accepted so far (the writer's index)
    rules = IngestRules(late_ms=late_ms)
    states = [ShardState(late_ms) for _ in range(shards)]
    limit_defs: dict[str, LimitDef] = {}
    chunks: dict[tuple[int, str, int], bytes] = {}  # unique_count limits' stored chunks
    now = anchor
    step_count = data.draw(st.integers(1, 14))
    for lsn in range(1, step_count + 1):
        kind = data.draw(st.sampled_from(["batch", "batch", "batch", "limit", "restart"]))
        got: list[Crossing] = []
        if kind == "limit":
            limit = data.draw(limits_strategy)
            limit_def = check_limit(limit, STATE_METERS)
            limit_defs.pop(limit.id, None)
            limit_defs[limit.id] = limit_def
            with localcontext(EXACT):
                for state in states:
                    got += state.alert_limits.add(limit_def, now)
            expected = limit_model.add(limit, now)
        elif kind == "restart":
            states = restart(states, route, list(limit_defs.values()), late_ms,
                             data.draw(st.sampled_from(["chunks", "chunks", "states", "none"])),
                             chunks)
            continue
        else:
            now += data.draw(st.one_of(st.just(0), st.integers(0, 6 * HOUR),
                                       st.integers(0, 3 * DAY)))
            batch = data.draw(state_events(now, late_ms))
            with localcontext(EXACT):
                slices = prepare_batch(batch, STATE_METERS, route, rules, now)
                # Dedup is the WAL writer's (shards apply only accepted events): as it does.
                flags = []
                for key in batch_keys(slices):
                    flags.append(key in seen_ids)
                    seen_ids.add(key)
                drop_duplicates(slices, flags)
                for state, shard_slice in zip(states, slices, strict=True):
                    got += state.apply(lsn, shard_slice, now)[2]
            before = len(model.events)
            model.ingest(batch)
            expected = limit_model.after_batch(model.events[before:])
        assert Counter((lid, c, Decimal(t), Decimal(v), s) for lid, c, _, t, v, s in got) == (
            Counter((lid, c, Decimal(t), Decimal(v), s) for lid, c, t, v, s in expected)
        ), kind
        check_states(states, limit_model, now, late_ms)


def test_no_stored_usage_is_read_once_a_state_exists() -> None:
    """The seam (ShardState.limit_partial) is read only to create a missing state: once
    per (limit, customer, period), not once per batch, for every aggregation."""
    now = ANCHORS_MS[4]  # near a month end
    route = ShardRouter(1)
    for meter in METERS:
        state = ShardState(40 * DAY)
        reads: list[tuple[str, int]] = []
        real = state.limit_partial

        def counting(limit: LimitDef, customer: str, start: int, end: int,
                     real: Any = real, reads: list[tuple[str, int]] = reads) -> Any:
            reads.append((customer, start))
            return real(limit, customer, start, end)

        state.limit_partial = counting  # type: ignore[method-assign]
        limit = check_limit(Limit(id="m", meter_api_name=meter.name, thresholds=[10**9],
                                  period="month", timezone="UTC"), STATE_METERS)

        def batch(ts: int, lsn: int, meter: Meter = meter, state: ShardState = state) -> None:
            events = [Event(meter.name, customer, lsn + k, ts + k, {"user": f"u{lsn}-{k}"})
                      for customer in ("acme", "globex") for k in range(5)]
            with localcontext(EXACT):
                for groups in prepare_batch(events, STATE_METERS, route, IngestRules(), None):
                    state.apply(lsn, groups, now)

        batch(now - HOUR, 1)
        state.alert_limits.add(limit, now)
        assert reads == [("acme", period_bounds(now, limit.limit)[0]),
                         ("globex", period_bounds(now, limit.limit)[0])]
        for lsn in range(2, 40):
            batch(now - lsn * MINUTE, lsn)
        assert len(reads) == 2, meter.name
        previous = period_bounds(period_bounds(now, limit.limit)[0] - 1, limit.limit)[0]
        for lsn in range(40, 50):  # late events into the month before: one read each
            batch(previous + lsn * MINUTE, lsn)
        assert reads[2:] == [("acme", previous), ("globex", previous)], meter.name
        assert len(reads) == 4


def test_a_period_is_forgotten_only_once_no_event_can_reach_it() -> None:
    """States and fired masks live until the period ended more than the late limit (plus
    a minute, rounded to the hour) before the batch's received time; an event up to the
    late limit into the period still finds them, and fires nothing twice."""
    late_ms = 2 * HOUR
    rules = IngestRules(late_ms=late_ms)
    route = ShardRouter(1)
    state = ShardState(late_ms)
    reads: list[int] = []
    real = state.limit_partial

    def counting(limit: LimitDef, customer: str, start: int, end: int) -> Any:
        reads.append(start)
        return real(limit, customer, start, end)

    state.limit_partial = counting  # type: ignore[method-assign]
    limit = check_limit(Limit(id="h", meter_api_name="m_count", thresholds=[1, 3],
                              period="hour"), STATE_METERS)
    hour_start = ANCHORS_MS[0]
    state.alert_limits.add(limit, hour_start)

    def ingest(now: int, ts: int, lsn: int) -> list[Crossing]:
        events = [Event("m_count", "acme", 1, ts)]
        with localcontext(EXACT):
            (groups,) = prepare_batch(events, STATE_METERS, route, rules, now)
            return state.apply(lsn, groups, now)[2]

    assert [c[3] for c in ingest(hour_start + 10 * MINUTE, hour_start, 1)] == [1]
    period_end = hour_start + HOUR
    # The last moment an event may still arrive for the period: its state is kept.
    last_chance = period_end - 1 + late_ms
    assert ingest(last_chance, period_end - 1, 2) == []
    assert reads == [hour_start]  # created once, when the first event came
    assert state.alert_limits.fired["h"] == {("acme", hour_start): 1}
    assert finalize(limit.meter.kind, state.alert_limits.states["h"][hour_start]
                    .partials["acme"]) == 2
    # Once the period is out of reach (and the hourly pass ran), it is forgotten.
    later = period_end + late_ms + MINUTE + HOUR
    ingest(later, later, 3)
    assert hour_start not in state.alert_limits.states["h"]
    assert ("acme", hour_start) not in state.alert_limits.fired["h"]


def test_latest_orders_equal_times_by_log_position_across_batches() -> None:
    """A latest state orders events with equal timestamps as the buckets do: by
    ``lsn << SEQ_SHIFT | index in batch``, so a later batch wins over an earlier one
    whatever their indexes."""
    route = ShardRouter(1)
    state = ShardState()
    limit = check_limit(Limit(id="l", meter_api_name="m_latest", thresholds=[100]),
                        STATE_METERS)
    ts = ANCHORS_MS[1]
    state.alert_limits.add(limit, ts)
    for lsn, batch_values in ((1, [1, 2]), (2, [3]), (3, [4, 5, 6]), (4, [7])):
        with localcontext(EXACT):
            (groups,) = prepare_batch([Event("m_latest", "acme", v, ts) for v in batch_values],
                                      STATE_METERS, route, IngestRules(), None)
            state.apply(lsn, groups, ts)
        start = period_bounds(ts, limit.limit)[0]
        partial = state.alert_limits.states["l"][start].partials["acme"]
        assert finalize(limit.meter.kind, partial) == batch_values[-1]


def test_a_shard_part_written_before_limit_states_still_decodes() -> None:
    old = records.encode([[], [["l1", [["acme", 0, 1]]]]])  # meters, fired: no states
    part = records.decode_part(old)
    assert part.fired == [["l1", [["acme", 0, 1]]]] and part.limit_states == []
