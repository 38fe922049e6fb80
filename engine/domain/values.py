"""Exact meter values.

Pure domain layer: standard library only. Values are kept as ``int`` whenever
they are integral and as ``Decimal`` otherwise, and are always added in the
``EXACT`` decimal context, which traps any rounding: a sum is exact to the last
digit or it raises.
"""

from __future__ import annotations

import decimal
from decimal import Decimal

# Input bounds: generous for metering, small enough that sums stay cheap.
MAX_ABS_VALUE = 10**30
MAX_FRACTION_DIGITS = 18

EXACT = decimal.Context(
    prec=decimal.MAX_PREC,
    Emax=decimal.MAX_EMAX,
    Emin=decimal.MIN_EMIN,
    traps=[decimal.InvalidOperation, decimal.Inexact, decimal.Overflow, decimal.DivisionByZero],
)
# avg is the one aggregation that divides; it rounds like Python's default context.
AVG_CONTEXT = decimal.Context(prec=28, rounding=decimal.ROUND_HALF_EVEN)

Number = int | Decimal


def exact_value(raw: object) -> Number:
    """Turn an input meter value into an exact ``int`` or ``Decimal``.

    Raises ``ValueError`` with a reason a user can act on.
    """
    kind = type(raw)
    if kind is int:
        value_int: int = raw  # type: ignore[assignment]
        if -MAX_ABS_VALUE < value_int < MAX_ABS_VALUE:
            return value_int
        raise ValueError(f"meter value {value_int} is out of range (|value| < 1e30)")
    if kind is bool:
        raise ValueError("meter value must be a number, not a boolean")
    if kind is float:
        as_float: float = raw  # type: ignore[assignment]
        if as_float != as_float or as_float in (float("inf"), float("-inf")):
            raise ValueError(f"meter value {as_float!r} is not a finite number")
        number = Decimal(repr(as_float))
    elif kind is Decimal:
        number = raw  # type: ignore[assignment]
    elif kind is str:
        try:
            number = Decimal(raw)  # type: ignore[arg-type]
        except decimal.InvalidOperation:
            raise ValueError(f"meter value {raw!r} is not a decimal number") from None
    else:
        raise ValueError(f"meter value must be a number, got {kind.__name__}")
    if not number.is_finite():
        raise ValueError(f"meter value {raw!r} is not a finite number")
    if not -MAX_ABS_VALUE < number < MAX_ABS_VALUE:
        raise ValueError(f"meter value {raw!r} is out of range (|value| < 1e30)")
    if number == number.to_integral_value():
        return int(number)
    exponent = number.as_tuple().exponent
    assert isinstance(exponent, int)
    if -exponent > MAX_FRACTION_DIGITS:
        raise ValueError(
            f"meter value {raw!r} has more than {MAX_FRACTION_DIGITS} digits after the point"
        )
    return number


def average(total: Number, count: int) -> Number:
    """``total / count``: an ``int`` when exact and integral, else a 28-digit Decimal."""
    if type(total) is int and total % count == 0:
        return total // count
    quotient = AVG_CONTEXT.divide(Decimal(total), Decimal(count))
    if quotient == quotient.to_integral_value() and type(total) is int:
        return int(quotient)
    return quotient
