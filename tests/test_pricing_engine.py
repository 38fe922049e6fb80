"""The engine with pricing: plans, assignments, invoices, final invoices and adjustments,
cost limits and what old logs and peers see (docs/pricing.md)."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import msgspec
import pytest
import trio

from engine import (
    Alert,
    Charge,
    Event,
    IngestRules,
    InvalidRequest,
    Limit,
    Meter,
    Plan,
    Query,
    Tier,
    UnknownCustomer,
    open_engine,
)
from engine.domain import records
from engine.storage import MemoryStore
from tests.helpers.events import DAY, HOUR, utc_ms

NOV = utc_ms(2026, 11, 1)
DEC = utc_ms(2026, 12, 1)
JAN = utc_ms(2027, 1, 1)
MID_NOV = utc_ms(2026, 11, 15, 12)

PRO = Plan(id="pro", currency="USD", fixed_fee="20", charges=[
    Charge(meter_api_name="api_calls", model="graduated", tiers=[
        Tier(up_to=1000, unit_price="0.01"), Tier(up_to=None, unit_price="0.005")]),
    Charge(meter_api_name="storage_gb", model="volume", tiers=[
        Tier(up_to=10, unit_price="1"), Tier(up_to=None, unit_price="0.5", flat_fee="2")]),
    Charge(meter_api_name="seats", model="package", package_size=100, package_price="5",
           free_units=100),
    Charge(meter_api_name="tokens", model="per_unit", unit_price="0.002", id="tokens-eu",
           dimensions={"region": ["eu"]}),
    Charge(meter_api_name="tokens", model="per_unit", unit_price="0.003", id="tokens-us",
           dimensions={"region": ["us"]}),
])
METERS = [Meter(name="api_calls"), Meter(name="storage_gb", aggregation="max"),
          Meter(name="seats"), Meter(name="tokens")]


class Clock:
    def __init__(self, now_ms: int) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms


async def setup(eng, at_ms: int = NOV) -> None:  # type: ignore[no-untyped-def]
    for meter in METERS:
        await eng.define_meter(meter)
    await eng.define_plan(PRO)
    await eng.assign_plan("acme", "pro", effective_from_ms=at_ms)


def usage_events(ts: int) -> list[Event]:
    return [Event("api_calls", "acme", 1500, ts), Event("storage_gb", "acme", 12, ts),
            Event("seats", "acme", 201, ts),
            Event("tokens", "acme", 1000, ts, {"region": "eu"}),
            Event("tokens", "acme", 1000, ts, {"region": "us"}),
            Event("tokens", "acme", 7, ts, {"region": "ap"}),
            Event("tokens", "acme", 9, ts)]


async def test_invoice_rates_each_charge_and_names_the_plan_version() -> None:
    clock = Clock(MID_NOV)
    async with open_engine(store=MemoryStore(), shards=3, clock_ms=clock) as eng:
        await setup(eng)
        await eng.ingest(usage_events(MID_NOV - HOUR))
        inv = await eng.invoice("acme", MID_NOV)
    assert (inv.plan_id, inv.plan_version, inv.currency, inv.status) == ("pro", 1, "USD", "open")
    assert (inv.period_start_ms, inv.period_end_ms) == (NOV, DEC)
    lines = {(line.kind, line.charge_id): line for line in inv.lines}
    assert lines[("fixed", None)].amount == Decimal("20.00")
    assert lines[("fixed", None)].meter_api_name is None
    calls = lines[("usage", "api_calls")]
    assert (calls.quantity, calls.amount) == (1500, Decimal("12.50"))  # 10 + 500 * 0.005
    assert [t.amount for t in calls.tiers] == [Decimal("10.00"), Decimal("2.500")]
    assert lines[("usage", "storage_gb")].amount == Decimal("8.00")  # 12 * 0.5 + 2
    assert lines[("usage", "seats")].amount == Decimal("10.00")  # (201 - 100) -> 2 packages
    assert lines[("usage", "tokens-eu")].amount == Decimal("2.00")
    assert lines[("usage", "tokens-us")].amount == Decimal("3.00")
    assert inv.total == sum(line.amount for line in inv.lines) == Decimal("55.50")


async def test_a_charges_dimensions_mean_what_query_filter_means() -> None:
    async with open_engine(store=MemoryStore(), shards=2, clock_ms=Clock(MID_NOV)) as eng:
        await setup(eng)
        await eng.ingest(usage_events(MID_NOV - HOUR))
        inv = await eng.invoice("acme", MID_NOV)
        for line in inv.lines:
            if line.meter_api_name != "tokens":
                continue
            charge = next(c for c in PRO.charges if c.charge_id == line.charge_id)
            result = await eng.query(Query(meter_api_name="tokens", start_ms=NOV, end_ms=DEC,
                                           filter={"customer_id": ["acme"],
                                                   **charge.dimensions}))
            assert line.quantity == result.rows[0].value == 1000


async def test_plans_are_versioned_and_survive_restarts(tmp_path: Path) -> None:
    clock = Clock(MID_NOV)
    for snapshot_on_close in (False, True):
        data = tmp_path / str(snapshot_on_close)
        async with open_engine(data, shards=2, clock_ms=clock,
                               snapshot_on_close=snapshot_on_close) as eng:
            await setup(eng)
            assert (await eng.define_plan(PRO)).version == 1  # identical: no new version
            cheaper = msgspec.structs.replace(PRO, fixed_fee=Decimal("15"))
            assert (await eng.define_plan(cheaper)).version == 2
            await eng.ingest(usage_events(MID_NOV - HOUR))
            before = await eng.invoice("acme", MID_NOV)
        async with open_engine(data, shards=3, clock_ms=clock) as eng:
            assert [p.version for p in eng.plan_versions("pro")] == [1, 2]
            assert eng.get_plan("pro", 1) == msgspec.structs.replace(PRO, version=1)
            after = await eng.invoice("acme", MID_NOV)
            assert eng.plan_assignments("acme")[0].starts_ms == NOV
        assert after.plan_version == 2 and after.total == before.total == Decimal("50.50")
        assert after.lines == before.lines


async def test_assignments_take_effect_at_period_starts() -> None:
    async with open_engine(store=MemoryStore(), shards=1, clock_ms=Clock(MID_NOV)) as eng:
        for meter in METERS:
            await eng.define_meter(meter)
        await eng.define_plan(PRO)
        await eng.define_plan(Plan(id="basic", currency="USD", fixed_fee="1"))
        first = await eng.assign_plan("acme", "basic", effective_from_ms=MID_NOV)
        assert first.starts_ms == NOV  # a first plan: from its period's start
        second = await eng.assign_plan("acme", "pro", effective_from_ms=MID_NOV)
        assert second.starts_ms == DEC  # then: the next period start, no proration
        assert (await eng.invoice("acme", MID_NOV)).plan_id == "basic"
        assert (await eng.invoice("acme", DEC + DAY)).plan_id == "pro"
        with pytest.raises(UnknownCustomer):
            await eng.invoice("acme", NOV - DAY)
        with pytest.raises(UnknownCustomer):
            await eng.invoice("nobody", MID_NOV)
        with pytest.raises(InvalidRequest, match="unknown plan"):
            await eng.assign_plan("acme", "gold", effective_from_ms=MID_NOV)
        with pytest.raises(InvalidRequest, match="unknown meter"):
            await eng.define_plan(Plan(id="x", charges=[Charge(meter_api_name="nope")]))


async def test_final_invoices_are_stored_and_corrections_become_adjustments(
        tmp_path: Path) -> None:
    clock = Clock(MID_NOV)
    late = IngestRules(late_ms=2 * DAY)
    async with open_engine(tmp_path, shards=2, clock_ms=clock, ingest_rules=late) as eng:
        await setup(eng)
        await eng.ingest([Event("api_calls", "acme", 100, MID_NOV)])
        assert (await eng.invoice("acme", MID_NOV)).status == "open"
        clock.now_ms = DEC + 2 * DAY  # the late-event limit after November passed
        final = await eng.invoice("acme", MID_NOV)
        assert final.status == "final" and final.total == Decimal("21.00")
        await eng.define_plan(msgspec.structs.replace(PRO, fixed_fee=Decimal("99")))
        assert await eng.invoice("acme", MID_NOV) == final  # never recomputed
    # Reopened with a longer late-event limit, November takes a late event.
    clock.now_ms = DEC + 3 * DAY
    async with open_engine(tmp_path, shards=2, clock_ms=clock,
                           ingest_rules=IngestRules(late_ms=40 * DAY)) as eng:
        assert await eng.invoice("acme", MID_NOV) == final
        await eng.ingest([Event("api_calls", "acme", 300, MID_NOV)])
        december = await eng.invoice("acme", DEC + 3 * DAY)
        (adjustment,) = [line for line in december.lines if line.kind == "adjustment"]
        assert adjustment.amount == Decimal("3.00")
        assert adjustment.adjusts_period_start_ms == NOV
        assert adjustment.meter_api_name is None
        clock.now_ms = JAN + 41 * DAY
        december = await eng.invoice("acme", DEC + DAY)
        assert december.status == "final"
        assert [line.amount for line in december.lines if line.kind == "adjustment"] == [3]
        january = await eng.invoice("acme", JAN + DAY)
        assert not [line for line in january.lines if line.kind == "adjustment"]  # once only


async def test_cost_limits_fire_once_rearm_when_the_cost_falls_and_survive_restarts(
        tmp_path: Path) -> None:
    clock = Clock(MID_NOV)
    # Volume tiers make the cost fall as usage grows: 9 GB cost 9, 11 GB cost 5.5 + 2.
    plan = Plan(id="vol", currency="EUR", charges=[Charge(
        meter_api_name="storage_gb", model="volume",
        tiers=[Tier(up_to=10, unit_price="1"), Tier(unit_price="0.5", flat_fee="2")])])
    async with open_engine(tmp_path, shards=2, clock_ms=clock) as eng:
        await eng.define_meter(Meter(name="storage_gb", aggregation="max"))
        await eng.define_plan(plan)
        await eng.assign_plan("acme", "vol", effective_from_ms=NOV)
        await eng.add_limit(Limit(id="spend", meter_api_name=None, customer_id="acme",
                                  thresholds=[Decimal("8")], period="month", measure="cost"))
        ack = await eng.ingest([Event("storage_gb", "acme", 9, MID_NOV)], report_alerts=True)
        (alert,) = ack.alerts
        assert (alert.measure, alert.currency, alert.meter_api_name) == ("cost", "EUR", None)
        assert (alert.threshold, alert.value, alert.period_start_ms) == (8, Decimal("9.00"), NOV)
        ack = await eng.ingest([Event("storage_gb", "acme", 9, MID_NOV)], report_alerts=True)
        assert ack.alerts == []  # fired once per period
        ack = await eng.ingest([Event("storage_gb", "acme", 11, MID_NOV)], report_alerts=True)
        assert ack.alerts == []  # 7.50: below, re-armed
    async with open_engine(tmp_path, shards=3, clock_ms=clock) as eng:
        assert eng.next_alert_seq() == 1
        ack = await eng.ingest([Event("storage_gb", "acme", 13, MID_NOV)], report_alerts=True)
        (again,) = ack.alerts  # 8.50: crosses again, with a new seq
        assert (again.seq, again.value) == (1, Decimal("8.50"))
        assert [limit.measure for limit in eng.limits()] == ["cost"]
        assert await eng.remove_limit("spend") is True
        assert eng.limits() == [] and await eng.remove_limit("spend") is False


async def test_cost_limits_for_every_customer_and_per_meter() -> None:
    async with open_engine(store=MemoryStore(), shards=2, clock_ms=Clock(MID_NOV)) as eng:
        await setup(eng)
        await eng.assign_plan("globex", "pro", effective_from_ms=NOV)
        await eng.add_limit(Limit(id="calls", meter_api_name="api_calls", thresholds=[5],
                                  period="month", measure="cost"))
        ack = await eng.ingest([Event("api_calls", "acme", 600, MID_NOV),
                                Event("api_calls", "globex", 400, MID_NOV),
                                Event("tokens", "globex", 10**6, MID_NOV, {"region": "eu"})],
                               report_alerts=True)
        assert [(a.customer_id, a.value) for a in ack.alerts] == [("acme", Decimal("6.00"))]


@pytest.mark.parametrize(("limit", "message"), [
    (Limit(id="u", meter_api_name=None, thresholds=[1]), "needs a meter"),
    (Limit(id="c", meter_api_name=None, thresholds=[1], period="day", measure="cost"),
     "billing month"),
    (Limit(id="c", meter_api_name=None, customer_id="acme", thresholds=[1], period="month",
           timezone="Asia/Tokyo", measure="cost"), "timezone"),
    (Limit(id="c", meter_api_name=None, thresholds=[0.5], period="month", measure="cost"),
     "float"),
    (Limit(id="c", meter_api_name="nope", thresholds=[1], period="month", measure="cost"),
     "unknown meter"),
])
async def test_bad_cost_and_meterless_limits_are_refused(limit: Limit, message: str) -> None:
    async with open_engine(store=MemoryStore(), shards=1, clock_ms=Clock(MID_NOV)) as eng:
        await setup(eng)
        with pytest.raises(InvalidRequest, match=message):
            await eng.add_limit(limit)


class OldLimit(msgspec.Struct, frozen=True, rename="camel", omit_defaults=True):
    """A limit as written before pricing (no ``measure``)."""

    id: str
    meter_api_name: str
    thresholds: list[int]
    customer_id: str | None = None
    period: str = "day"
    timezone: str = "UTC"


class OldAlert(msgspec.Struct, frozen=True, rename="camel"):
    seq: int
    limit_id: str
    customer_id: str
    meter_api_name: str
    threshold: int | Decimal
    value: int | Decimal
    period_start_ms: int
    crossed_at_ms: int


def test_old_records_and_peers_decode_with_the_defaults() -> None:
    class OldWalLimit(msgspec.Struct, tag="limit", array_like=True):
        limit: OldLimit
        received_ms: int

    raw = msgspec.msgpack.encode(OldWalLimit(OldLimit("l", "calls", [5]), 7))
    record = records.decode_record(raw)
    assert isinstance(record, records.WalLimit)
    assert record.limit.measure == "usage" and record.limit.meter_api_name == "calls"
    old_alert = msgspec.msgpack.encode(OldAlert(1, "l", "acme", "calls", 5, 6, 0, 9))
    alert = records.decode_alert(old_alert)
    assert (alert.measure, alert.currency) == ("usage", None)
    # And an old peer reads a new alert: it ignores the fields it does not know.
    new = Alert(2, "spend", "acme", "calls", Decimal(5), Decimal(6), 0, 9, "cost", "USD")
    assert msgspec.json.decode(msgspec.json.encode(new), type=OldAlert).limit_id == "spend"
    assert msgspec.msgpack.decode(records.encode_alert(new), type=OldAlert).value == 6
    usage_limit = Limit(id="l", meter_api_name="calls", thresholds=[5])
    assert b"measure" not in msgspec.json.encode(usage_limit)  # the same bytes as before


async def test_a_limit_for_every_customer_rates_usage_that_changed_while_none_applied() -> None:
    # acme's amounts were rated under a first limit, then its usage changed while only
    # globex had one: a limit for every customer must rate acme's usage as it is now.
    plan = Plan(id="p", currency="USD", fixed_fee="5",
                charges=[Charge(meter_api_name="calls", unit_price="0.5")])
    async with open_engine(store=MemoryStore(), shards=2, clock_ms=Clock(MID_NOV)) as eng:
        await eng.define_meter(Meter(name="calls"))
        await eng.define_plan(plan)
        for customer in ("acme", "globex"):
            await eng.assign_plan(customer, "p", effective_from_ms=NOV)
        for customer in ("acme", "globex"):  # the second replaces the first
            await eng.add_limit(Limit(id="c1", meter_api_name=None, customer_id=customer,
                                      thresholds=[6], period="month", measure="cost"))
        await eng.ingest([Event("calls", "acme", 2, MID_NOV)])
        async with eng.subscribe(from_seq=0) as alerts:
            await eng.add_limit(Limit(id="c1", meter_api_name=None, thresholds=[6],
                                      period="month", measure="cost"))
            with trio.fail_after(10):
                alert = await alerts.__anext__()
    assert (alert.customer_id, alert.value) == ("acme", Decimal("6.00"))


async def test_concurrent_first_reads_of_a_final_invoice_store_it_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock(MID_NOV)
    async with open_engine(tmp_path, shards=2, clock_ms=clock,
                           ingest_rules=IngestRules(late_ms=2 * DAY)) as eng:
        await setup(eng)
        await eng.ingest([Event("api_calls", "acme", 100, MID_NOV)])
        clock.now_ms = DEC + 2 * DAY
        logged: list[object] = []
        log_extension = eng._log_extension

        async def counting(record: bytes, action: object):  # type: ignore[no-untyped-def]
            logged.append(action)
            return await log_extension(record, action)

        monkeypatch.setattr(eng, "_log_extension", counting)
        read: list[object] = []

        async def read_invoice() -> None:
            read.append(await eng.invoice("acme", MID_NOV))

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(read_invoice)
        assert len(logged) == 1  # one StoreFinalInvoice record for five first reads
        assert all(invoice == read[0] for invoice in read)
        assert read[0].status == "final"  # type: ignore[attr-defined]
        assert await eng.invoice("acme", MID_NOV) == read[0]
        assert len(logged) == 1
