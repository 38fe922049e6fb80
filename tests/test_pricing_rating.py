"""Rating against naive oracles (Hypothesis) and against the vendors' published examples.

Pure tests of ``engine.pricing.rating``: each charge model is compared with an oracle
written the slow, obvious way (unit by unit for integer usage, walking tier edges for
decimal usage), at tier edges, zero usage, free units above usage, decimal and huge
quantities.
"""

from __future__ import annotations

import decimal
from decimal import Decimal

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import Charge, Plan, Tier
from engine.pricing.rating import (
    EXACT,
    MINOR_UNITS,
    PlanError,
    billing_period,
    check_plan,
    plan_lines,
    rate_charge,
    round_money,
    total_of,
)

D = Decimal
prices = st.decimals(min_value=0, max_value=100, places=4)


@st.composite
def tier_lists(draw: st.DrawFn, decimal_edges: bool = False) -> list[Tier]:
    count = draw(st.integers(1, 5))
    if decimal_edges:
        edges = sorted(set(draw(st.lists(st.decimals(min_value=D("0.5"), max_value=500,
                                                       places=2), min_size=count - 1,
                                          max_size=count - 1))))
    else:
        edges = sorted(set(draw(st.lists(st.integers(1, 60), min_size=count - 1,
                                         max_size=count - 1))))
    tiers = [Tier(up_to=D(edge), unit_price=draw(prices), flat_fee=draw(prices))
             for edge in edges]
    tiers.append(Tier(up_to=None, unit_price=draw(prices), flat_fee=draw(prices)))
    return tiers


def tier_of_unit(tiers: list[Tier], unit: int) -> int:
    """The index of the tier holding the unit numbered ``unit`` (1-based)."""
    return next(i for i, t in enumerate(tiers) if t.up_to is None or unit <= t.up_to)


def graduated_by_unit(tiers: list[Tier], quantity: int) -> Decimal:
    """Each unit priced alone by its tier, plus the flat fee of each tier a unit reached."""
    with decimal.localcontext(EXACT):
        total = D(0)
        reached = set()
        for unit in range(1, quantity + 1):
            index = tier_of_unit(tiers, unit)
            total += tiers[index].unit_price
            reached.add(index)
        return total + sum((tiers[i].flat_fee for i in reached), D(0))


def graduated_by_edges(tiers: list[Tier], quantity: Decimal) -> Decimal:
    """Walk the edges: the part of [0, quantity] inside each tier's (lower, upper]."""
    with decimal.localcontext(EXACT):
        total = D(0)
        lower = D(0)
        for tier in tiers:
            upper = tier.up_to if tier.up_to is not None else max(quantity, lower)
            inside = min(quantity, upper) - lower
            if inside > 0:
                total += inside * tier.unit_price + tier.flat_fee
            lower = upper
        return total


def volume_oracle(tiers: list[Tier], quantity: Decimal) -> Decimal:
    with decimal.localcontext(EXACT):
        if quantity <= 0:
            return D(0)
        for tier in tiers:
            if tier.up_to is None or quantity <= tier.up_to:
                return quantity * tier.unit_price + tier.flat_fee
    raise AssertionError


def package_by_unit(size: int, price: Decimal, free: int, quantity: int) -> Decimal:
    """Count the packages one billable unit at a time: a new one starts every ``size``."""
    packages = 0
    for unit in range(1, quantity + 1):
        if unit <= free:
            continue
        if (unit - free - 1) % size == 0:
            packages += 1
    return packages * price


@settings(max_examples=150, deadline=None)
@given(tiers=tier_lists(), quantity=st.integers(0, 150))
def test_graduated_matches_pricing_every_unit_alone(tiers: list[Tier], quantity: int) -> None:
    charge = Charge(meter_api_name="m", model="graduated", tiers=tiers)
    check_plan(Plan(id="p", charges=[charge]))
    assert rate_charge(charge, D(quantity))[0] == graduated_by_unit(tiers, quantity)


@settings(max_examples=150, deadline=None)
@given(tiers=tier_lists(decimal_edges=True),
       quantity=st.decimals(min_value=0, max_value=1000, places=3))
def test_graduated_decimal_usage_matches_walking_the_edges(tiers: list[Tier],
                                                          quantity: Decimal) -> None:
    charge = Charge(meter_api_name="m", model="graduated", tiers=tiers)
    amount, used = rate_charge(charge, quantity)
    assert amount == graduated_by_edges(tiers, quantity)
    assert sum((t.amount for t in used), D(0)) == amount  # line.tiers add up, unrounded


@settings(max_examples=150, deadline=None)
@given(tiers=tier_lists(decimal_edges=True), data=st.data())
def test_usage_exactly_on_a_tier_edge_belongs_to_the_lower_tier(tiers: list[Tier],
                                                               data: st.DataObject) -> None:
    edges = [t.up_to for t in tiers if t.up_to is not None]
    if not edges:
        return
    edge = data.draw(st.sampled_from(edges))
    index = next(i for i, t in enumerate(tiers) if t.up_to == edge)
    volume = Charge(meter_api_name="m", model="volume", tiers=tiers)
    assert rate_charge(volume, edge)[0] == edge * tiers[index].unit_price + tiers[index].flat_fee
    graduated = Charge(meter_api_name="m", model="graduated", tiers=tiers)
    used = rate_charge(graduated, edge)[1]
    assert len(used) == index + 1  # the next tier is not reached: no flat fee of its own


@settings(max_examples=150, deadline=None)
@given(tiers=tier_lists(decimal_edges=True),
       quantity=st.decimals(min_value=0, max_value=1000, places=3))
def test_volume_prices_all_units_at_the_reached_tier(tiers: list[Tier],
                                                    quantity: Decimal) -> None:
    charge = Charge(meter_api_name="m", model="volume", tiers=tiers)
    assert rate_charge(charge, quantity)[0] == volume_oracle(tiers, quantity)


@settings(max_examples=150, deadline=None)
@given(size=st.integers(1, 20), price=prices, free=st.integers(0, 200),
       quantity=st.integers(0, 200))
def test_package_counts_started_packages_after_free_units(size: int, price: Decimal,
                                                         free: int, quantity: int) -> None:
    charge = Charge(meter_api_name="m", model="package", package_size=size, package_price=price,
                    free_units=free)
    assert rate_charge(charge, D(quantity))[0] == package_by_unit(size, price, free, quantity)


@settings(max_examples=100, deadline=None)
@given(price=prices, free=st.decimals(min_value=0, max_value=100, places=2),
       quantity=st.decimals(min_value=0, max_value=10**6, places=6))
def test_per_unit_is_price_times_usage_above_free_units(price: Decimal, free: Decimal,
                                                       quantity: Decimal) -> None:
    charge = Charge(meter_api_name="m", unit_price=price, free_units=free)
    with decimal.localcontext(EXACT):
        expected = max(quantity - free, D(0)) * price
    assert rate_charge(charge, quantity)[0] == expected


def test_huge_quantities_stay_exact() -> None:
    quantity = D("1" + "0" * 30 + ".000000000000000001")  # beyond the default precision
    charge = Charge(meter_api_name="m", unit_price="0.000001")
    expected = D("1" + "0" * 24 + "." + "0" * 23 + "1")
    assert rate_charge(charge, quantity)[0] == expected
    tiers = [Tier(up_to=10**29, unit_price="0.01"), Tier(unit_price="0.001")]
    graduated = Charge(meter_api_name="m", model="graduated", tiers=tiers)
    assert rate_charge(graduated, quantity)[0] == graduated_by_edges(tiers, quantity)


def test_zero_usage_costs_nothing_in_every_model_but_min_amount() -> None:
    tiers = [Tier(up_to=10, unit_price="1", flat_fee="5"), Tier(unit_price="0.5")]
    for charge in [Charge(meter_api_name="m", unit_price="3"),
                   Charge(meter_api_name="m", model="graduated", tiers=tiers),
                   Charge(meter_api_name="m", model="volume", tiers=tiers),
                   Charge(meter_api_name="m", model="package", package_size=10,
                          package_price="7")]:
        assert rate_charge(charge, D(0))[0] == 0
    plan = Plan(id="p", charges=[Charge(meter_api_name="m", unit_price="3", min_amount="2.5")])
    (line,) = plan_lines(plan, {})
    assert (line.quantity, line.amount, line.exact_amount) == (0, D("2.50"), D("2.5"))


@settings(max_examples=150, deadline=None)
@given(price=st.decimals(min_value=0, max_value=10, places=5),
       quantity=st.integers(0, 10**6),
       low=st.none() | st.decimals(min_value=0, max_value=50, places=3),
       span=st.none() | st.decimals(min_value=0, max_value=50, places=3),
       currency=st.sampled_from(sorted(MINOR_UNITS)))
def test_a_line_is_clamped_then_rounded_half_up_once(price: Decimal, quantity: int,
                                                    low: Decimal | None, span: Decimal | None,
                                                    currency: str) -> None:
    high = None if span is None else (low or D(0)) + span
    charge = Charge(meter_api_name="m", unit_price=price, min_amount=low, max_amount=high)
    (line,) = plan_lines(Plan(id="p", currency=currency, charges=[charge]),
                         {"m": D(quantity)})
    exact = price * quantity
    if low is not None:
        exact = max(exact, low)
    if high is not None:
        exact = min(exact, high)
    assert line.exact_amount == exact
    step = D(1).scaleb(-MINOR_UNITS[currency])
    assert line.amount == exact.quantize(step, rounding=decimal.ROUND_HALF_UP)
    assert abs(line.amount - exact) <= step / 2


def test_rounding_half_up_per_line_and_the_total_sums_rounded_lines() -> None:
    plan = Plan(id="p", currency="USD", fixed_fee="0.005", charges=[
        Charge(meter_api_name="a", unit_price="0.0025"),
        Charge(meter_api_name="b", unit_price="0.0025")])
    lines = plan_lines(plan, {"a": D(1), "b": D(1)})
    # 0.005 -> 0.01 and 0.0025 -> 0.00 each: the total is 0.01, not round(0.01) of the sum.
    assert [line.amount for line in lines] == [D("0.01"), D("0.00"), D("0.00")]
    assert total_of(lines) == D("0.01")
    assert round_money(D("2.5"), "JPY") == 3 and round_money(D("-2.5"), "JPY") == -3
    assert round_money(D("1.0005"), "KWD") == D("1.001")


def test_plan_minimum_tops_up_the_period() -> None:
    plan = Plan(id="p", fixed_fee="10", minimum="50",
                charges=[Charge(meter_api_name="m", unit_price="1")])
    lines = plan_lines(plan, {"m": D("12.345")})
    assert [(line.kind, line.amount) for line in lines] == [
        ("fixed", D("10.00")), ("usage", D("12.35")), ("minimum", D("27.65"))]
    assert total_of(lines) == 50
    assert [line.kind for line in plan_lines(plan, {"m": D(100)})] == ["fixed", "usage"]


# ------------------------------------------------------- the vendors' worked examples


STRIPE_TIERS = [Tier(up_to=5, unit_price="7"), Tier(up_to=10, unit_price="6.5"),
                Tier(up_to=None, unit_price="6")]


@pytest.mark.parametrize(("fonts", "volume", "graduated"), [
    (1, "7", "7"), (5, "35", "35"), (6, "39", "41.5"), (20, "120", "127.5"),
    (25, "150", "157.5")])
def test_stripe_typographic_fonts(fonts: int, volume: str, graduated: str) -> None:
    # Stripe, "Set up tiered pricing" (docs.stripe.com/subscriptions/pricing-models/
    # tiered-pricing): fonts 1-5 at 7 USD, 6-10 at 6.50, 11+ at 6. The volume column is
    # Stripe's table; the graduated one follows its rule (5 fonts: 35 USD, as volume).
    vol = Charge(meter_api_name="fonts", model="volume", tiers=STRIPE_TIERS)
    grad = Charge(meter_api_name="fonts", model="graduated", tiers=STRIPE_TIERS)
    assert rate_charge(vol, D(fonts))[0] == D(volume)
    assert rate_charge(grad, D(fonts))[0] == D(graduated)


def test_lago_package_201_units() -> None:
    # Lago, "Package" charge model (docs.getlago.com/guide/plans/charges/charge-models/
    # package): $5 per 100 units, the first 100 free: 201 units cost $0 + $5 + $5 = $10.
    charge = Charge(meter_api_name="api", model="package", package_size=100,
                    package_price="5", free_units=100)
    assert rate_charge(charge, D(201))[0] == 10


def test_lago_standard_and_graduated() -> None:
    # Lago, "Charges" (doc.getlago.com/docs/guide/plans/charges): standard: $0.05 per API
    # call, 1,000 calls = $50. Graduated: $1 per unit for the first 100, $0.50 for the
    # next 100, $0.10 for any additional unit (250 units: 100 + 50 + 5 = $155).
    standard = Charge(meter_api_name="api", unit_price="0.05")
    assert rate_charge(standard, D(1000))[0] == 50
    graduated = Charge(meter_api_name="api", model="graduated", tiers=[
        Tier(up_to=100, unit_price="1"), Tier(up_to=200, unit_price="0.5"),
        Tier(unit_price="0.1")])
    assert rate_charge(graduated, D(250))[0] == 155


# ------------------------------------------------------- definitions


@pytest.mark.parametrize(("plan", "message"), [
    (Plan(id="p", currency="XXX"), "unknown currency"),
    (Plan(id="p", timezone="Mars/Base"), "zone"),
    (Plan(id="p", charges=[Charge(meter_api_name="m", model="graduated")]), "tiers"),
    (Plan(id="p", charges=[Charge(meter_api_name="m", model="volume",
                                  tiers=[Tier(up_to=5), Tier(up_to=5), Tier()])]), "increase"),
    (Plan(id="p", charges=[Charge(meter_api_name="m", model="volume", tiers=[Tier(up_to=5)])]),
     "last tier"),
    (Plan(id="p", charges=[Charge(meter_api_name="m", model="package", package_size=0)]),
     "package_size"),
    (Plan(id="p", charges=[Charge(meter_api_name="m", min_amount="5", max_amount="1")]),
     "min_amount"),
    (Plan(id="p", charges=[Charge(meter_api_name="m"), Charge(meter_api_name="m")]),
     "two charges"),
    (Plan(id="p", charges=[Charge(meter_api_name="m", dimensions={"customer_id": ["a"]})]),
     "dimensions"),
    (Plan(id="p", fixed_fee="-1"), "fixed_fee"),
])
def test_bad_plans_are_refused(plan: Plan, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        check_plan(plan, ["m"])


def test_floats_are_never_money() -> None:
    with pytest.raises(ValueError, match="float"):
        Tier(unit_price=0.1)  # type: ignore[arg-type]
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"id": "p", "fixedFee": "abc"}', type=Plan)
    decoded = msgspec.json.decode(b'{"id": "p", "fixedFee": "0.10"}', type=Plan)
    assert decoded.fixed_fee == D("0.10") and type(decoded.fixed_fee) is D


def test_billing_month_is_exact_across_dst() -> None:
    # March 2026 in New York: 31 days less the hour lost on 8 March.
    start, end = billing_period(1_773_000_000_000, "America/New_York")
    assert end - start == 31 * 86_400_000 - 3_600_000
    assert billing_period(start, "America/New_York") == (start, end)
    assert billing_period(end - 1, "America/New_York") == (start, end)
