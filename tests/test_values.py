"""engine.domain.values: exact values and the two 64-bit bounds of their encodings."""

from __future__ import annotations

from decimal import Decimal

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.domain.values import (
    INT64_MAX,
    INT64_MIN,
    UINT64_MAX,
    average,
    exact_value,
    fits_int64,
    fits_msgpack_int,
    wide_as_decimal,
)

NEAR_BOUNDS = st.one_of(
    st.integers(INT64_MIN - 3, INT64_MIN + 3),
    st.integers(INT64_MAX - 3, INT64_MAX + 3),
    st.integers(UINT64_MAX - 3, UINT64_MAX + 3),
    st.integers(-(10**30), 10**30),
)


def test_the_bounds_are_exactly_64_bits() -> None:
    assert (fits_int64(INT64_MIN), fits_int64(INT64_MAX)) == (True, True)
    assert (fits_int64(INT64_MIN - 1), fits_int64(INT64_MAX + 1)) == (False, False)
    assert (fits_msgpack_int(INT64_MIN), fits_msgpack_int(UINT64_MAX)) == (True, True)
    assert (fits_msgpack_int(INT64_MIN - 1), fits_msgpack_int(UINT64_MAX + 1)) == (False, False)


@given(NEAR_BOUNDS)
def test_fits_msgpack_int_is_what_msgspec_can_encode(value: int) -> None:
    try:
        msgspec.msgpack.encode(value)
    except OverflowError:
        encodes = False
    else:
        encodes = True
    assert fits_msgpack_int(value) is encodes


@given(NEAR_BOUNDS)
def test_wide_as_decimal_keeps_the_number_and_only_widens_beyond_int64(value: int) -> None:
    wide = wide_as_decimal(value)
    assert wide == value
    assert type(wide) is (int if fits_int64(value) else Decimal)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(wide), type=int | Decimal) == value


def test_wide_as_decimal_leaves_other_numbers_alone() -> None:
    half = Decimal("0.5")
    assert wide_as_decimal(half) is half
    assert wide_as_decimal(1.5) == 1.5


@pytest.mark.parametrize(("raw", "expected"), [
    (7, 7),
    (0.1, Decimal("0.1")),  # the decimal of the float's shortest repr
    (2.0, 2),  # integral values become ints
    ("12.50", Decimal("12.50")),
    (Decimal("3E+2"), 300),
])
def test_exact_value_normalises(raw: object, expected: object) -> None:
    value = exact_value(raw)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(("raw", "reason"), [
    (True, "boolean"),
    (float("nan"), "finite"),
    ("inf", "finite"),
    (10**30, "out of range"),
    ("1e30", "out of range"),
    ("0." + "1" * 19, "digits after the point"),
    ("ten", "not a decimal number"),
    (None, "must be a number"),
])
def test_exact_value_refuses_with_a_reason(raw: object, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        exact_value(raw)


def test_average_is_an_int_when_exact_else_28_digits() -> None:
    assert average(10, 5) == 2 and type(average(10, 5)) is int
    assert average(10, 4) == Decimal("2.5")
    assert average(1, 3) == Decimal("0.3333333333333333333333333333")
