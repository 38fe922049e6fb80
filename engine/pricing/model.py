"""Pricing's public structs: plans, charges, tiers, assignments and invoices.

Pure pricing layer: the standard library and msgspec only. These structs are
the wire, HTTP and write-ahead-log shapes of pricing, so their field names are
a contract (snake_case in Python, camelCase when serialised, like
``engine.schema``). Money and quantities are exact ``Decimal`` (or ``int``):
a string such as ``"0.01"`` given to a constructor becomes ``Decimal("0.01")``;
a ``float`` is refused (``ValueError``), because ``0.1`` is not a price anyone
meant. Whether a plan makes sense as a whole is checked by
``engine.pricing.rating.check_plan``.
"""

from __future__ import annotations

import csv
import io
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

import msgspec

ChargeModel = Literal["per_unit", "graduated", "volume", "package"]
CHARGE_MODELS: tuple[str, ...] = ("per_unit", "graduated", "volume", "package")
LineKind = Literal["usage", "fixed", "minimum", "adjustment"]
InvoiceStatus = Literal["open", "final"]


def exact_amount(raw: object, what: str) -> Decimal:
    """``raw`` (a Decimal, an int or a decimal string) as a finite Decimal."""
    if isinstance(raw, bool) or isinstance(raw, float):
        raise ValueError(f"{what} must be a decimal string, an int or a Decimal, "
                         f"never a float (got {raw!r})")
    if isinstance(raw, Decimal):
        value = raw
    elif isinstance(raw, int | str):
        try:
            value = Decimal(raw)
        except InvalidOperation:
            raise ValueError(f"{what} is not a decimal number: {raw!r}") from None
    else:
        raise ValueError(f"{what} must be a decimal string, an int or a Decimal, got "
                         f"{type(raw).__name__}")
    if not value.is_finite():
        raise ValueError(f"{what} must be finite, got {raw!r}")
    return value


def _coerce(struct: Any, names: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    """Turn the named money/quantity fields into Decimals in place (frozen structs)."""
    for name in names + optional:
        raw = getattr(struct, name)
        if raw is None and name in optional:
            continue
        if type(raw) is not Decimal:
            msgspec.structs.force_setattr(struct, name, exact_amount(raw, name))


class Tier(msgspec.Struct, frozen=True, rename="camel", omit_defaults=True):
    """One price tier: units up to ``up_to`` (inclusive; None: no upper end) at
    ``unit_price`` each, plus ``flat_fee`` once when the tier is reached."""

    up_to: Decimal | None = None
    unit_price: Decimal = Decimal(0)
    flat_fee: Decimal = Decimal(0)

    def __post_init__(self) -> None:
        _coerce(self, ("unit_price", "flat_fee"), ("up_to",))


class Charge(msgspec.Struct, frozen=True, rename="camel", omit_defaults=True):
    """How one meter's usage in a billing period is priced (docs/pricing.md).

    ``model``: ``per_unit`` (``unit_price`` per unit), ``graduated`` (each unit at
    the price of the tier it falls in, plus each reached tier's flat fee),
    ``volume`` (every unit at the price of the tier the total reaches, plus that
    tier's flat fee) or ``package`` (``package_price`` per started package of
    ``package_size`` units). ``free_units`` are taken off the usage first, in
    every model. ``min_amount`` / ``max_amount`` clamp the charge's exact amount
    per period. ``dimensions`` prices only the usage whose dimensions match,
    exactly as ``Query.filter`` does. ``id`` names the charge on invoice lines
    (default: the meter's name).
    """

    meter_api_name: str
    model: ChargeModel = "per_unit"
    unit_price: Decimal = Decimal(0)
    tiers: list[Tier] = []
    package_size: Decimal = Decimal(1)
    package_price: Decimal = Decimal(0)
    free_units: Decimal = Decimal(0)
    min_amount: Decimal | None = None
    max_amount: Decimal | None = None
    dimensions: dict[str, list[str]] = {}
    id: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        _coerce(self, ("unit_price", "package_size", "package_price", "free_units"),
                ("min_amount", "max_amount"))

    @property
    def charge_id(self) -> str:
        return self.id or self.meter_api_name


class Plan(msgspec.Struct, frozen=True, rename="camel", omit_defaults=True):
    """A price plan: its charges, a ``fixed_fee`` per period, an optional
    ``minimum`` commitment per period, in ``currency``. The billing period is the
    calendar month in ``timezone`` (an IANA name). ``version`` is set by
    ``Engine.define_plan``: 1 for the first definition of an id, then +1 for each
    changed one."""

    id: str
    currency: str = "USD"
    charges: list[Charge] = []
    fixed_fee: Decimal = Decimal(0)
    minimum: Decimal | None = None
    timezone: str = "UTC"
    description: str = ""
    version: int = 0

    def __post_init__(self) -> None:
        _coerce(self, ("fixed_fee",), ("minimum",))


def with_version(plan: Plan, version: int) -> Plan:
    return msgspec.structs.replace(plan, version=version)


class PlanAssignment(msgspec.Struct, frozen=True, rename="camel"):
    """``customer_id`` is billed on ``plan_id`` from the first period start at or
    after ``effective_from_ms`` (a customer's first plan: from the start of the
    period that contains it)."""

    customer_id: str
    plan_id: str
    effective_from_ms: int
    starts_ms: int = 0  # when it takes effect (set by the engine)


class TierAmount(msgspec.Struct, frozen=True, rename="camel"):
    """How one tier contributed to a line: its units and its exact (unrounded) amount."""

    up_to: Decimal | None
    quantity: Decimal
    unit_price: Decimal
    flat_fee: Decimal
    amount: Decimal


class InvoiceLine(msgspec.Struct, frozen=True, rename="camel"):
    """One line: ``kind`` is ``usage``, ``fixed``, ``minimum`` or ``adjustment``;
    ``meter_api_name`` is None for fixed and minimum lines. ``amount`` is rounded
    half-up to the currency's minor unit; ``exact_amount`` is the clamped amount
    before rounding. An adjustment line names the period it corrects
    (``adjusts_period_start_ms``)."""

    kind: LineKind
    charge_id: str | None
    meter_api_name: str | None
    quantity: Decimal
    amount: Decimal
    exact_amount: Decimal
    tiers: list[TierAmount] = []
    description: str = ""
    adjusts_period_start_ms: int | None = None


class Invoice(msgspec.Struct, frozen=True, rename="camel"):
    """A customer's invoice for one billing period ``[period_start_ms, period_end_ms)``.

    ``open`` until the late-event limit after the period's end has passed (its
    amounts may still change), then ``final``: stored once, never recomputed.
    ``total`` is the sum of the rounded lines. ``as_of_ms`` is when it was
    computed (for a final invoice: when it was stored)."""

    customer_id: str
    plan_id: str
    plan_version: int
    currency: str
    period_start_ms: int
    period_end_ms: int
    status: InvoiceStatus
    lines: list[InvoiceLine]
    total: Decimal
    as_of_ms: int

    def csv(self) -> str:
        """The lines as CSV (one row each, then the total), exact decimals as text: the
        export ``meter invoice --csv`` and ``GET /invoices/{customer}?format=csv`` answer."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for line in self.lines:
            writer.writerow([line.kind, line.charge_id or "", line.meter_api_name or "",
                             line.quantity, line.amount, line.exact_amount,
                             "" if line.adjusts_period_start_ms is None
                             else line.adjusts_period_start_ms, line.description])
        writer.writerow(["total", "", "", "", self.total, self.total, "", self.currency])
        return out.getvalue()


CSV_COLUMNS = ("kind", "charge_id", "meter_api_name", "quantity", "amount", "exact_amount",
               "adjusts_period_start_ms", "description")
