"""Write-ahead-log records and snapshot parts: their msgpack encoding.

Pure domain layer: msgspec and the standard library. A WAL record is a tagged
msgspec struct so later record kinds can be added without breaking old logs.
"""

from __future__ import annotations

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


def decode_record(raw: bytes) -> WalRecord:
    return _record_decoder.decode(raw)


def decode_parts(raw: bytes) -> list[MeterPart]:
    return _parts_decoder.decode(raw)


def decode_meter(raw: bytes) -> Meter:
    return _meter_decoder.decode(raw)
