"""Exact meter values, and the 64-bit bounds of their encodings.

Pure domain layer: standard library only (so the protocol layer may import it
too). Values are kept as ``int`` whenever they are integral and as ``Decimal``
otherwise, and are always added in the ``EXACT`` decimal context, which traps
any rounding: a sum is exact to the last digit or it raises.

Exact values are unbounded, encodings are not: msgpack integers are 64 bits
(signed down to ``-2**63``, unsigned up to ``2**64 - 1``), and clients in other
languages read them as signed int64. Two bounds follow, each used on purpose:

- ``fits_int64``: what leaves the engine for others to read (wire messages,
  limit thresholds in the engine state, widened snapshot columns). A larger
  integer travels as its decimal string (``wide_as_decimal``).
- ``fits_msgpack_int``: what msgpack can encode at all. The write-ahead log
  and the alert log are read only by this engine; they encode first and widen
  only after an ``OverflowError``, so checking every event on the ingest path
  is never needed, and an integer up to ``2**64 - 1`` is stored as msgpack's
  uint64. Stored data keeps decoding either way: a decimal string decodes to
  the same exact value.
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

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
UINT64_MAX = 2**64 - 1

def fits_int64(value: int) -> bool:
    """True if ``value`` is a signed 64-bit integer, as every msgpack reader reads it."""
    return INT64_MIN <= value <= INT64_MAX


def fits_msgpack_int(value: int) -> bool:
    """True if msgpack can encode ``value`` as an integer (int64 or uint64)."""
    return INT64_MIN <= value <= UINT64_MAX


def wide_as_decimal(value: int | float | Decimal) -> int | float | Decimal:
    """``value`` itself, unless it is an ``int`` beyond int64: then the same number as
    a ``Decimal``, which msgspec encodes as its decimal string."""
    if type(value) is int and not INT64_MIN <= value <= INT64_MAX:
        return Decimal(value)
    return value


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
