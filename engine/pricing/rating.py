"""Rating: a plan and a period's usage in, exact invoice lines out.

Pure pricing layer: the standard library, msgspec, ``engine.pricing.model`` and
the metering domain's calendar windows (``engine.domain.windows``: the billing
month is the same calendar window queries use, exact across DST). No trio, no
storage, no reads of usage: the caller passes the quantities.

Arithmetic is ``Decimal`` in an exact context (every operation traps rounding),
so a huge quantity times a price is exact to the last digit. The one rounding
is at the end of each line: the clamped exact amount, half-up, to the
currency's minor unit (``MINOR_UNITS``). The total is the sum of rounded lines.
"""

from __future__ import annotations

import decimal
import functools
from collections.abc import Mapping, Sequence
from decimal import ROUND_HALF_UP, Decimal

from engine.domain.windows import WindowError, resolve_timezone, window_floor, window_spans
from engine.pricing.model import (
    CHARGE_MODELS,
    Charge,
    Invoice,
    InvoiceLine,
    Plan,
    TierAmount,
)

# ISO 4217 minor units of the currencies a plan may use (docs/pricing.md has the table).
MINOR_UNITS: dict[str, int] = {
    "USD": 2, "EUR": 2, "GBP": 2, "CHF": 2, "CAD": 2, "AUD": 2, "NZD": 2, "CNY": 2,
    "INR": 2, "BRL": 2, "MXN": 2, "SEK": 2, "NOK": 2, "DKK": 2, "PLN": 2, "CZK": 2,
    "SGD": 2, "HKD": 2, "ZAR": 2, "ILS": 2, "TRY": 2,
    "JPY": 0, "KRW": 0, "ISK": 0, "CLP": 0, "VND": 0,
    "BHD": 3, "KWD": 3, "OMR": 3, "JOD": 3, "TND": 3,
}
MAX_CHARGES = 100
MAX_TIERS = 100
MONTH_REACH_MS = 33 * 86_400_000

EXACT = decimal.Context(
    prec=decimal.MAX_PREC, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN,
    traps=[decimal.InvalidOperation, decimal.Inexact, decimal.Overflow,
           decimal.DivisionByZero],
)
ZERO = Decimal(0)


class PlanError(ValueError):
    """A plan that cannot be used; the message says why."""


def check_plan(plan: Plan, meter_names: Sequence[str] | None = None) -> Plan:
    """``plan`` if it can be rated (known meters, when ``meter_names`` is given)."""
    if type(plan) is not Plan:
        raise PlanError(f"expected a Plan, got {type(plan).__name__}")
    if type(plan.id) is not str or not plan.id or len(plan.id) > 256 or "/" in plan.id:
        raise PlanError("plan id must be a non-empty string of at most 256 characters "
                        "without '/'")
    if plan.currency not in MINOR_UNITS:
        raise PlanError(f"unknown currency {plan.currency!r}: use one of "
                        f"{', '.join(sorted(MINOR_UNITS))}")
    try:
        resolve_timezone(plan.timezone)
    except WindowError as exc:
        raise PlanError(str(exc)) from None
    _non_negative(plan.fixed_fee, "fixed_fee")
    if plan.minimum is not None:
        _non_negative(plan.minimum, "minimum")
    if not isinstance(plan.charges, list) or len(plan.charges) > MAX_CHARGES:
        raise PlanError(f"charges must be a list of at most {MAX_CHARGES}")
    seen: set[str] = set()
    for charge in plan.charges:
        _check_charge(charge, meter_names)
        if charge.charge_id in seen:
            raise PlanError(f"two charges with the id {charge.charge_id!r}: give each "
                            "charge of one meter its own id")
        seen.add(charge.charge_id)
    return plan


def _non_negative(value: Decimal, what: str) -> None:
    if type(value) is not Decimal or not value.is_finite() or value < 0:
        raise PlanError(f"{what} must be a non-negative decimal, got {value!r}")


def _check_charge(charge: Charge, meter_names: Sequence[str] | None) -> None:
    if type(charge) is not Charge:
        raise PlanError(f"expected a Charge, got {type(charge).__name__}")
    where = f"charge {charge.charge_id!r}"
    if meter_names is not None and charge.meter_api_name not in meter_names:
        raise PlanError(f"{where}: unknown meter {charge.meter_api_name!r}")
    if charge.model not in CHARGE_MODELS:
        raise PlanError(f"{where}: unknown model {charge.model!r}: use one of "
                        f"{', '.join(CHARGE_MODELS)}")
    for name in ("unit_price", "package_price", "free_units"):
        _non_negative(getattr(charge, name), f"{where}: {name}")
    for name in ("min_amount", "max_amount"):
        if getattr(charge, name) is not None:
            _non_negative(getattr(charge, name), f"{where}: {name}")
    if (charge.min_amount is not None and charge.max_amount is not None
            and charge.min_amount > charge.max_amount):
        raise PlanError(f"{where}: min_amount is above max_amount")
    if charge.model == "package" and not charge.package_size > 0:
        raise PlanError(f"{where}: package_size must be positive")
    if charge.model in ("graduated", "volume"):
        tiers = charge.tiers
        if not isinstance(tiers, list) or not 1 <= len(tiers) <= MAX_TIERS:
            raise PlanError(f"{where}: a {charge.model} charge needs 1 to {MAX_TIERS} tiers")
        previous = ZERO
        for index, tier in enumerate(tiers):
            _non_negative(tier.unit_price, f"{where}: tier {index} unit_price")
            _non_negative(tier.flat_fee, f"{where}: tier {index} flat_fee")
            last = index == len(tiers) - 1
            if tier.up_to is None:
                if not last:
                    raise PlanError(f"{where}: only the last tier may have no up_to")
                continue
            if last:
                raise PlanError(f"{where}: the last tier must have up_to=None (no upper end)")
            if not tier.up_to > previous:
                raise PlanError(f"{where}: tier up_to must increase and be positive")
            previous = tier.up_to
    elif charge.tiers:
        raise PlanError(f"{where}: tiers are for graduated and volume charges only")
    dimensions = charge.dimensions
    if not isinstance(dimensions, dict) or not all(
            type(k) is str and k and k != "customer_id" and isinstance(v, list)
            and all(type(s) is str for s in v) for k, v in dimensions.items()):
        raise PlanError(f"{where}: dimensions must map dimension keys (not customer_id) "
                        "to lists of strings")


# --------------------------------------------------------------- charge models


def rate_charge(charge: Charge, quantity: Decimal) -> tuple[Decimal, list[TierAmount]]:
    """The exact amount of ``quantity`` units under ``charge`` (before min/max), and the
    tiers it used (graduated and volume charges)."""
    if charge.model == "per_unit" and not charge.free_units:  # the common case, inline
        return EXACT.multiply(quantity if quantity > 0 else ZERO, charge.unit_price), []
    with decimal.localcontext(EXACT):
        billable = max(quantity - charge.free_units, ZERO)
        model = charge.model
        if model == "per_unit":
            return billable * charge.unit_price, []
        if model == "package":
            # Started packages (Decimal // truncates toward zero: both are >= 0 here).
            whole, rest = divmod(billable, charge.package_size)
            packages = whole + (1 if rest else 0)
            return packages * charge.package_price, []
        if model == "graduated":
            return _graduated(charge, billable)
        return _volume(charge, billable)


def _graduated(charge: Charge, billable: Decimal) -> tuple[Decimal, list[TierAmount]]:
    total = ZERO
    used: list[TierAmount] = []
    lower = ZERO
    for tier in charge.tiers:
        if billable <= lower:
            break  # not reached: neither its units nor its flat fee count
        upper = billable if tier.up_to is None else min(billable, tier.up_to)
        units = upper - lower
        amount = units * tier.unit_price + tier.flat_fee
        used.append(TierAmount(tier.up_to, units, tier.unit_price, tier.flat_fee, amount))
        total += amount
        if tier.up_to is None:
            break
        lower = tier.up_to
    return total, used


def _volume(charge: Charge, billable: Decimal) -> tuple[Decimal, list[TierAmount]]:
    if billable <= 0:
        return ZERO, []
    for tier in charge.tiers:
        if tier.up_to is None or billable <= tier.up_to:
            amount = billable * tier.unit_price + tier.flat_fee
            return amount, [TierAmount(tier.up_to, billable, tier.unit_price, tier.flat_fee,
                                       amount)]
    raise AssertionError("check_plan guarantees a last tier without an upper end")


def clamp(charge: Charge, amount: Decimal) -> Decimal:
    if charge.min_amount is not None and amount < charge.min_amount:
        amount = charge.min_amount
    if charge.max_amount is not None and amount > charge.max_amount:
        amount = charge.max_amount
    return amount


# Rounding half-up to a minor unit: exact precision, so only the quantize rounds.
_ROUNDING = decimal.Context(prec=decimal.MAX_PREC, Emax=decimal.MAX_EMAX,
                            Emin=decimal.MIN_EMIN, rounding=ROUND_HALF_UP,
                            traps=[decimal.InvalidOperation, decimal.Overflow])
_MINOR_STEPS = {currency: Decimal(1).scaleb(-places) for currency, places in MINOR_UNITS.items()}


def round_money(amount: Decimal, currency: str) -> Decimal:
    """Half-up to the currency's minor unit (the one rounding of a line)."""
    return _ROUNDING.quantize(amount, _MINOR_STEPS[currency])


# --------------------------------------------------------------- invoices


def charge_amount(charge: Charge, quantity: Decimal, currency: str) -> Decimal:
    """A usage line's amount alone: clamped, rounded (what cost limits compare)."""
    return round_money(clamp(charge, rate_charge(charge, quantity)[0]), currency)


def period_total(plan: Plan, usage_amounts: Sequence[Decimal]) -> Decimal:
    """The total of ``plan_lines`` without adjustments, from the rounded usage amounts."""
    with decimal.localcontext(EXACT):
        subtotal = round_money(plan.fixed_fee, plan.currency) + sum(usage_amounts, ZERO)
        if plan.minimum is not None and subtotal < plan.minimum:
            subtotal += round_money(plan.minimum - subtotal, plan.currency)
        return subtotal


def usage_line(charge: Charge, quantity: Decimal, currency: str) -> InvoiceLine:
    exact, tiers = rate_charge(charge, quantity)
    exact = clamp(charge, exact)
    return InvoiceLine(kind="usage", charge_id=charge.charge_id,
                       meter_api_name=charge.meter_api_name, quantity=quantity,
                       amount=round_money(exact, currency), exact_amount=exact, tiers=tiers,
                       description=charge.description)


def plan_lines(plan: Plan, quantities: Mapping[str, Decimal],
               adjustments: Sequence[InvoiceLine] = ()) -> list[InvoiceLine]:
    """The lines of one period: fixed fee, one usage line per charge (``quantities``
    by charge id; a missing one is zero usage), adjustments, then the minimum top-up
    if the period's own lines stay below the plan's minimum."""
    currency = plan.currency
    lines: list[InvoiceLine] = []
    if plan.fixed_fee:
        lines.append(InvoiceLine(kind="fixed", charge_id=None, meter_api_name=None,
                                 quantity=Decimal(1), amount=round_money(plan.fixed_fee, currency),
                                 exact_amount=plan.fixed_fee, description="fixed fee"))
    for charge in plan.charges:
        lines.append(usage_line(charge, quantities.get(charge.charge_id, ZERO), currency))
    with decimal.localcontext(EXACT):
        subtotal = sum((line.amount for line in lines), ZERO)
        if plan.minimum is not None and subtotal < plan.minimum:
            top_up = plan.minimum - subtotal
            lines.append(InvoiceLine(kind="minimum", charge_id=None, meter_api_name=None,
                                     quantity=Decimal(1), amount=round_money(top_up, currency),
                                     exact_amount=top_up, description="minimum commitment"))
    lines.extend(adjustments)
    return lines


def total_of(lines: Sequence[InvoiceLine]) -> Decimal:
    with decimal.localcontext(EXACT):
        return sum((line.amount for line in lines), ZERO)


def adjustment_line(stored: Invoice, recomputed: Sequence[InvoiceLine]) -> InvoiceLine | None:
    """The difference between a final invoice and what its period rates at now, or None."""
    with decimal.localcontext(EXACT):
        own = [line for line in recomputed if line.kind != "adjustment"]
        stored_own = [line for line in stored.lines if line.kind != "adjustment"]
        delta = total_of(own) - total_of(stored_own)
    if not delta:
        return None
    return InvoiceLine(kind="adjustment", charge_id=None, meter_api_name=None,
                       quantity=Decimal(1), amount=delta, exact_amount=delta,
                       description=f"correction of the period starting at "
                                   f"{stored.period_start_ms} ms",
                       adjusts_period_start_ms=stored.period_start_ms)


@functools.lru_cache(maxsize=65536)
def billing_period(at_ms: int, timezone: str) -> tuple[int, int]:
    """[start, end) of the calendar month in ``timezone`` containing ``at_ms``
    (remembered: cost limits ask for the same few months for every customer)."""
    zone = resolve_timezone(timezone)
    start = window_floor(at_ms, "month", zone)
    return start, window_spans(start, start + MONTH_REACH_MS, "month", zone)[0][2]


def as_quantity(value: int | Decimal) -> Decimal:
    return value if type(value) is Decimal else Decimal(value)
