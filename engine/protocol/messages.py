"""Protocol messages: msgspec structs, a tagged union per direction.

Pure protocol layer: msgspec, the standard library and ``engine.schema``.
Every message is a msgpack map with a ``type`` tag; field names are camelCase
on the wire. Requests carry an ``id`` chosen by the client (a non-negative
integer, unique among its requests in flight); the reply carries the same
``id``. See docs/protocol.md.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import msgspec

from engine.schema import Event, Meter, Query, QueryResult

PROTOCOL_VERSION = 1

_BASE = {"tag_field": "type", "rename": "camel", "omit_defaults": True}


# --------------------------------------------------------------- client → server


class Hello(msgspec.Struct, tag="hello", **_BASE):  # type: ignore[call-arg]
    """The first frame on a connection."""

    version: int
    api_key: str | None = None
    client: str = ""


class Ping(msgspec.Struct, tag="ping", **_BASE):  # type: ignore[call-arg]
    id: int


class DefineMeter(msgspec.Struct, tag="define_meter", **_BASE):  # type: ignore[call-arg]
    id: int
    meter: Meter


class ListMeters(msgspec.Struct, tag="list_meters", **_BASE):  # type: ignore[call-arg]
    id: int


class Ingest(msgspec.Struct, tag="ingest", **_BASE):  # type: ignore[call-arg]
    id: int
    events: list[Event]


class QueryRequest(msgspec.Struct, tag="query", **_BASE):  # type: ignore[call-arg]
    id: int
    query: Query


class Stats(msgspec.Struct, tag="stats", **_BASE):  # type: ignore[call-arg]
    id: int


ClientMessage = Hello | Ping | DefineMeter | ListMeters | Ingest | QueryRequest | Stats
REQUEST_TYPES = (Ping, DefineMeter, ListMeters, Ingest, QueryRequest, Stats)


# --------------------------------------------------------------- server → client


class Welcome(msgspec.Struct, tag="welcome", **_BASE):  # type: ignore[call-arg]
    version: int
    server: str
    max_frame_bytes: int
    max_in_flight: int


class Pong(msgspec.Struct, tag="pong", **_BASE):  # type: ignore[call-arg]
    id: int


class MeterReply(msgspec.Struct, tag="meter", **_BASE):  # type: ignore[call-arg]
    id: int
    meter: Meter


class MetersReply(msgspec.Struct, tag="meters", **_BASE):  # type: ignore[call-arg]
    id: int
    meters: list[Meter]


class IngestReply(msgspec.Struct, tag="ingest_ack", **_BASE):  # type: ignore[call-arg]
    id: int
    accepted: int
    duplicates: int
    lsn: int


class QueryReply(msgspec.Struct, tag="query_result", **_BASE):  # type: ignore[call-arg]
    id: int
    result: QueryResult


class StatsReply(msgspec.Struct, tag="stats", **_BASE):  # type: ignore[call-arg]
    id: int
    stats: dict[str, Any]


class ErrorReply(msgspec.Struct, tag="error", **_BASE):  # type: ignore[call-arg]
    """A refused request (``id`` set) or a connection-level error (``id`` absent).

    ``problems`` lists ``[index, reason]`` for a rejected batch.
    """

    code: str
    detail: str
    id: int | None = None
    problems: list[tuple[int, str]] | None = None


ServerMessage = (
    Welcome | Pong | MeterReply | MetersReply | IngestReply | QueryReply | StatsReply | ErrorReply
)

_client_decoder = msgspec.msgpack.Decoder(ClientMessage)
_server_decoder = msgspec.msgpack.Decoder(ServerMessage)


def _encode_hook(obj: Any) -> Any:
    raise TypeError(f"cannot encode {type(obj).__name__}")


_encoder = msgspec.msgpack.Encoder(enc_hook=_encode_hook)


class MessageError(Exception):
    """A frame that is not a valid message; the stream itself is still in sync."""


def decode_client_message(payload: bytes) -> ClientMessage:
    try:
        return _client_decoder.decode(payload)
    except msgspec.ValidationError as exc:
        raise MessageError(f"invalid message: {exc}") from None
    except msgspec.DecodeError as exc:
        raise MessageError(f"undecodable message: {exc}") from None


def decode_server_message(payload: bytes) -> ServerMessage:
    try:
        return _server_decoder.decode(payload)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise MessageError(f"invalid server message: {exc}") from None


def encode_message(message: msgspec.Struct) -> bytes:
    """msgpack payload of ``message``. Integers beyond 64 bits travel as decimal strings."""
    try:
        return _encoder.encode(message)
    except OverflowError:
        if isinstance(message, QueryReply):
            rows = [
                msgspec.structs.replace(row, value=Decimal(row.value))
                if type(row.value) is int and not -(2**63) <= row.value < 2**64
                else row
                for row in message.result.rows
            ]
            result = msgspec.structs.replace(message.result, rows=rows)
            return _encoder.encode(msgspec.structs.replace(message, result=result))
        if isinstance(message, Ingest):
            wide = [
                msgspec.structs.replace(e, meter_value=Decimal(e.meter_value))
                if type(e.meter_value) is int and not -(2**63) <= e.meter_value < 2**64
                else e
                for e in message.events
            ]
            return _encoder.encode(msgspec.structs.replace(message, events=wide))
        raise
