"""Property test: skipping the rating of changes that cannot reach a threshold changes
no crossing (``engine.pricing.extension._Room``).

Two pricing extensions get the same plan, cost limits and random usage feeds (rises,
falls, volume tier edges, free units, packages, decimal quantities, thresholds near
the amounts): one rates every change, the other skips what its headroom absorbs.
Their crossings must be equal, batch by batch.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from engine import Charge, Limit, Meter, Plan, Tier
from engine.domain.meters import IngestRules, check_meter
from engine.pricing.extension import PricingExtension, feed_id
from engine.pricing.ledger import AddCostLimit, AssignPlan, DefinePlan
from engine.pricing.rating import billing_period

START_MS = 1_764_547_200_000  # 2025-12-01T00:00:00Z
CUSTOMERS = ["acme", "globex"]


def prepare(plan: Plan, limits: list[Limit], skip: bool) -> PricingExtension:
    ext = PricingExtension()
    ext.skip_unreachable = skip
    actions: list[Any] = [DefinePlan(plan, START_MS)]
    actions += [AssignPlan(c, plan.id, START_MS) for c in CUSTOMERS]
    actions += [AddCostLimit(limit, START_MS) for limit in limits]
    meters = {name: check_meter(Meter(name=name, aggregation="sum"), IngestRules())
              for name in ("calls", "seats")}
    for action in actions:
        ext.commit(action, START_MS, meters)
    ext.acknowledge(actions, [], START_MS)
    return ext


tiers = st.sampled_from([
    [Tier(up_to=3, unit_price="10"), Tier(up_to=6, unit_price="4"),
     Tier(unit_price="1", flat_fee="2")],
    [Tier(up_to=5, unit_price="0", flat_fee="1"), Tier(unit_price="2.5", flat_fee="3")],
    [Tier(unit_price="0.333")],
])


@st.composite
def charges(draw: Any, meter: str) -> Charge:
    model = draw(st.sampled_from(["per_unit", "graduated", "volume", "package"]))
    args: dict[str, Any] = {"free_units": draw(st.sampled_from(["0", "2", "2.5"]))}
    if model == "per_unit":
        args["unit_price"] = draw(st.sampled_from(["0.5", "3", "0.004"]))
    elif model == "package":
        args.update(package_size=draw(st.sampled_from([3, 10])),
                    package_price=draw(st.sampled_from(["5", "0.7"])))
    else:
        args["tiers"] = draw(tiers)
    return Charge(meter_api_name=meter, model=model, id=f"{meter}-{model}-{draw(st.integers())}",
                  dimensions=draw(st.sampled_from([{}, {"region": ["eu"]}, {"region": ["us"]}])),
                  min_amount=draw(st.sampled_from([None, "1"])),
                  max_amount=draw(st.sampled_from([None, "60"])), **args)


@st.composite
def scenarios(draw: Any) -> tuple[Plan, list[Limit], list[list[tuple[str, str, Any]]]]:
    plan_charges = [draw(charges(meter)) for meter in draw(st.lists(
        st.sampled_from(["calls", "seats"]), min_size=1, max_size=5))]
    plan = Plan(id="pro", currency=draw(st.sampled_from(["USD", "JPY"])),
                fixed_fee=draw(st.sampled_from(["0", "5"])),
                minimum=draw(st.sampled_from([None, "30.005"])), charges=plan_charges)
    limits = [Limit(id=f"l{i}", meter_api_name=draw(st.sampled_from([None, "calls", "seats"])),
                    customer_id=draw(st.sampled_from([None, *CUSTOMERS])),
                    thresholds=draw(st.lists(st.integers(1, 80).map(Decimal), min_size=1,
                                             max_size=3)),
                    period="month", measure="cost")
              for i in range(draw(st.integers(1, 3)))]
    fids = [feed_id(c, plan.timezone) for c in plan_charges]
    usage = st.one_of(st.integers(0, 40), st.decimals("0", "40", places=2))
    batches = draw(st.lists(st.lists(st.tuples(st.sampled_from(fids), st.sampled_from(CUSTOMERS),
                                               usage), max_size=6), max_size=25))
    return plan, limits, batches


@settings(max_examples=80, deadline=None)
@given(scenarios())
def test_skipping_absorbed_changes_keeps_every_crossing(
        scenario: tuple[Plan, list[Limit], list[list[tuple[str, str, Any]]]]) -> None:
    plan, limits, batches = scenario
    rating, skipping = prepare(plan, limits, False), prepare(plan, limits, True)
    start = billing_period(START_MS, "UTC")[0]
    for index, batch in enumerate(batches):
        at_ms = START_MS + 1000 * (index + 1)
        feed = [(fid, customer, start, value) for fid, customer, value in batch]
        assert skipping.acknowledge([], feed, at_ms) == rating.acknowledge([], feed, at_ms)
    assert skipping.fired == rating.fired
