"""engine.domain.records: the stored shapes, and which bound widens an integer where.

The write-ahead log and the alert log keep whatever msgpack encodes (up to uint64);
what clients read (limit thresholds, via the engine state and the wire) stops at int64.
Either way a widened value decodes to the same exact number.
"""

from __future__ import annotations

from decimal import Decimal

import msgspec
import pytest

from engine.domain import records
from engine.domain.values import INT64_MAX, UINT64_MAX, exact_value
from engine.schema import Alert, Event, Limit

NOW = 1_750_000_000_000


def logged_values(values: list[int]) -> list[object]:
    raw = records.encode_batch([Event("m", "c", v, NOW) for v in values], NOW)
    record = records.decode_record(raw)
    assert isinstance(record, records.WalBatch) and record.received_ms == NOW
    return [e.meter_value for e in record.events]


def test_a_wal_batch_widens_only_what_msgpack_cannot_encode() -> None:
    assert logged_values([1, INT64_MAX + 1, UINT64_MAX]) == [1, INT64_MAX + 1, UINT64_MAX]
    assert all(type(v) is int for v in logged_values([INT64_MAX + 1, UINT64_MAX]))
    wide = logged_values([1, UINT64_MAX, UINT64_MAX + 1, -(2**63) - 1])
    assert [type(v) for v in wide] == [int, int, Decimal, Decimal]
    assert [exact_value(v) for v in wide] == [1, UINT64_MAX, UINT64_MAX + 1, -(2**63) - 1]


def test_thresholds_beyond_int64_travel_as_decimal_strings() -> None:
    small = Limit("l", "m", [1, INT64_MAX])
    assert records.wide_ints_as_decimals(small) is small
    wide = records.wide_ints_as_decimals(Limit("l", "m", [1, INT64_MAX + 1, 0.5]))
    assert wide.thresholds == [Decimal(1), Decimal(INT64_MAX + 1), 0.5]
    decoded = msgspec.msgpack.decode(records.encode(wide), type=Limit)
    assert [exact_value(t) for t in decoded.thresholds] == [1, INT64_MAX + 1, Decimal("0.5")]


def test_an_alert_beyond_msgpack_round_trips_exactly() -> None:
    alert = Alert(3, "l", "c", "m", threshold=10, value=UINT64_MAX + 1, period_start_ms=0,
                  crossed_at_ms=NOW)
    decoded = records.decode_alert(records.encode_alert(alert))
    assert (decoded.threshold, decoded.value) == (10, UINT64_MAX + 1)
    assert (decoded.seq, decoded.limit_id, decoded.crossed_at_ms) == (3, "l", NOW)
    small = Alert(4, "l", "c", "m", threshold=10, value=UINT64_MAX, period_start_ms=0,
                  crossed_at_ms=NOW)
    assert records.decode_alert(records.encode_alert(small)) == small  # uint64 as it is


def test_snapshot_values_decode_from_their_strings() -> None:
    assert records.decimal_or_int(5) == 5
    assert records.decimal_or_int(str(2**70)) == 2**70
    assert records.decimal_or_int("-12") == -12
    assert records.decimal_or_int("0.25") == Decimal("0.25")


def test_a_batch_read_for_its_ids_names_the_same_events() -> None:
    """What a restart reads of the batches its snapshot covers: the ids, as logged."""
    events = [Event("calls", "acme", 1, NOW, {"region": "eu"}, "e-1"),
              Event("calls", "globex", Decimal("2.5"), NOW, unique_id=None),
              Event("users", "acme", UINT64_MAX, NOW, {"user": "u"}, "e-2")]
    batch = records.decode_batch_ids(records.encode_batch(events, NOW))
    assert batch is not None and batch.received_ms == NOW
    assert [(e.meter_api_name, e.customer_id, e.unique_id) for e in batch.events] == [
        ("calls", "acme", "e-1"), ("calls", "globex", None), ("users", "acme", "e-2")]
    limit = records.encode(records.WalRemoveLimit("l1", NOW))
    assert records.decode_batch_ids(limit) is None  # another kind of record
    with pytest.raises(msgspec.DecodeError):
        records.decode_batch_ids(b"\x92\xa5batch\x91\x81")  # corrupt: says so
