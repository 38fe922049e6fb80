"""Write-ahead-log records and snapshot parts: their msgpack encoding.

Pure domain layer: msgspec and the standard library. A WAL record is a tagged
msgspec struct so later record kinds can be added without breaking old logs.
"""

from __future__ import annotations

from decimal import Decimal

import msgspec

from engine.domain.shard import MeterPart
from engine.schema import Event, Meter


class WalBatch(msgspec.Struct, tag="batch", array_like=True):
    """One ingested batch, exactly as accepted (validated before it was logged)."""

    events: list[Event]


WalRecord = WalBatch

_encoder = msgspec.msgpack.Encoder()
_record_decoder = msgspec.msgpack.Decoder(WalRecord)
_parts_decoder = msgspec.msgpack.Decoder(list[MeterPart])
_meter_decoder = msgspec.msgpack.Decoder(Meter)


def encode(obj: object) -> bytes:
    return _encoder.encode(obj)


def encode_batch(events: list[Event]) -> bytes:
    """Encode a batch for the WAL.

    msgpack integers stop at 64 bits; an event value beyond that is logged as a
    decimal string, which decodes back to the same exact value.
    """
    try:
        return _encoder.encode(WalBatch(events))
    except OverflowError:
        wide = [
            msgspec.structs.replace(e, meter_value=Decimal(e.meter_value))
            if type(e.meter_value) is int and not -(2**63) <= e.meter_value < 2**64
            else e
            for e in events
        ]
        return _encoder.encode(WalBatch(wide))


def decode_record(raw: bytes) -> WalRecord:
    return _record_decoder.decode(raw)


def decode_parts(raw: bytes) -> list[MeterPart]:
    return _parts_decoder.decode(raw)


def decode_meter(raw: bytes) -> Meter:
    return _meter_decoder.decode(raw)
