"""engine.domain.meters: meter definitions and the ingest rules they are checked against."""

from __future__ import annotations

import pytest

from engine import IngestLimits as PublicIngestLimits
from engine.domain.aggregates import KIND_BY_AGGREGATION, SUM, UNIQUE
from engine.domain.meters import IngestLimits, IngestRules, check_meter, merge_meter
from engine.errors import MeterConflict
from engine.schema import AGGREGATIONS, Meter

RULES = IngestRules()


def test_every_aggregation_gets_its_own_kind() -> None:
    kinds = {check_meter(Meter("m", aggregation), RULES).kind  # type: ignore[arg-type]
             for aggregation in AGGREGATIONS if aggregation != "unique_count"}
    kinds.add(check_meter(Meter("u", "unique_count", unique_dimension="user"), RULES).kind)
    assert kinds == set(range(7)) == set(KIND_BY_AGGREGATION.values())
    assert check_meter(Meter("m"), RULES).kind == SUM


def test_a_unique_count_meter_names_its_dimension() -> None:
    meter = check_meter(Meter("users", "unique_count", unique_dimension="user"), RULES)
    assert (meter.name, meter.kind, meter.unique_dimension) == ("users", UNIQUE, "user")
    with pytest.raises(ValueError, match="needs unique_dimension"):
        check_meter(Meter("users", "unique_count"), RULES)
    with pytest.raises(ValueError, match="only meaningful"):
        check_meter(Meter("calls", "sum", unique_dimension="user"), RULES)


@pytest.mark.parametrize(("meter", "reason"), [
    (Meter(""), "non-empty"),
    (Meter("x" * 11), "longer than 10"),
    (Meter("m", "median"), "unknown aggregation 'median'"),  # type: ignore[arg-type]
])
def test_bad_meters_are_refused_with_a_reason(meter: Meter, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        check_meter(meter, IngestRules(max_value_chars=10))


def test_defining_a_meter_again_is_a_no_op_or_a_conflict() -> None:
    calls = check_meter(Meter("calls", "sum", description="API calls"), RULES)
    assert merge_meter(None, calls) is True
    same = check_meter(Meter("calls", "sum", description="reworded"), RULES)
    assert merge_meter(calls, same) is False
    with pytest.raises(MeterConflict, match=r"aggregation 'sum'.*as 'max'"):
        merge_meter(calls, check_meter(Meter("calls", "max"), RULES))
    users = check_meter(Meter("u", "unique_count", unique_dimension="user"), RULES)
    with pytest.raises(MeterConflict, match="on 'user'"):
        merge_meter(users, check_meter(Meter("u", "unique_count", unique_dimension="ip"), RULES))


def test_the_old_public_name_is_the_same_class() -> None:
    assert IngestLimits is IngestRules is PublicIngestLimits
    assert IngestRules(max_dimensions=2) == PublicIngestLimits(max_dimensions=2)
