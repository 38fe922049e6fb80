"""JSON codecs and request-body reading with size limits, for the HTTP shell.

Shell layer: msgspec, zlib and ``engine.http.errors``; no trio, no engine.

- JSON is written by one msgspec encoder with ``decimal_format="number"``:
  exact values (``int`` and ``Decimal``) become JSON numbers digit for digit,
  never passing through ``float`` and never quoted.
- JSON is read into typed structs; a number meant as a value decodes into
  ``int | Decimal``, so ``0.1`` is exactly 0.1 and integers stay ``int``.
- ``BodyReader`` enforces ``max_body_bytes`` on the bytes received *and* on
  the bytes inflated from ``Content-Encoding: gzip``, while it reads and
  inflates, so neither a huge body nor a gzip bomb is ever held whole: it
  stops at the first byte over the limit (413).
"""

from __future__ import annotations

import zlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec

from engine.http.errors import HttpError, Problem, bad_request

T = TypeVar("T")

_encoder = msgspec.json.Encoder(decimal_format="number")
GZIP_WBITS = 16 + zlib.MAX_WBITS  # gzip header and trailer required
INFLATE_CHUNK_BYTES = 64 * 1024


def encode_json(value: Any) -> bytes:
    return _encoder.encode(value)


def decode_json(body: bytes, type_: type[T], what: str = "body") -> T:
    """Decode ``body`` as ``type_``; any problem is a 400 that says where it is."""
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as exc:
        raise bad_request(f"invalid {what}: {exc}") from None
    except (msgspec.DecodeError, ValueError, RecursionError) as exc:
        raise bad_request(f"{what} is not valid JSON: {exc}") from None


def decode_each(raws: list[msgspec.Raw], type_: type[T]) -> tuple[list[T], list[Problem]]:
    """Decode every element; the problems name each bad element by index."""
    items: list[T] = []
    problems: list[Problem] = []
    decoder = msgspec.json.Decoder(type_)
    for index, raw in enumerate(raws):
        try:
            items.append(decoder.decode(raw))
        except msgspec.ValidationError as exc:
            problems.append(Problem(index, str(exc)))
        except (msgspec.DecodeError, ValueError, RecursionError) as exc:  # pragma: no cover
            problems.append(Problem(index, f"not valid JSON: {exc}"))
    return items, problems


def split_records(body: bytes) -> tuple[list[msgspec.Raw], bool]:
    """A JSON object or an array of them, as raw elements; ``True`` if it was one object."""
    try:
        parsed = msgspec.json.decode(body, type=list[msgspec.Raw] | dict[str, msgspec.Raw])
    except msgspec.ValidationError:
        raise bad_request("the body must be one JSON object or an array of objects") from None
    except (msgspec.DecodeError, ValueError, RecursionError) as exc:
        raise bad_request(f"body is not valid JSON: {exc}") from None
    if isinstance(parsed, dict):
        return [msgspec.Raw(body)], True
    return parsed, False


def too_large(limit_bytes: int, what: str = "request body") -> HttpError:
    return HttpError(413, "too_large", f"the {what} is over the {limit_bytes}-byte limit")


class BodyReader:
    """Reads an ASGI request body, inflating gzip, never past ``limit_bytes``."""

    def __init__(self, receive: Callable[[], Awaitable[dict[str, Any]]], limit_bytes: int,
                 content_length: int | None, content_encoding: str) -> None:
        self._receive = receive
        self.limit_bytes = limit_bytes
        self.content_length = content_length
        encoding = content_encoding.strip().lower()
        if encoding not in ("", "identity", "gzip", "x-gzip"):
            raise HttpError(415, "unsupported_encoding",
                            f"Content-Encoding {content_encoding!r} is not supported "
                            "(use gzip or none)")
        self.gzip = encoding in ("gzip", "x-gzip")

    async def read(self) -> bytes:
        if self.content_length is not None and self.content_length > self.limit_bytes:
            raise too_large(self.limit_bytes)  # refused before reading any of it
        received = 0
        chunks: list[bytes] = []
        inflater = _Inflater(self.limit_bytes) if self.gzip else None
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise HttpError(400, "disconnected", "the client went away mid-request")
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.limit_bytes:
                raise too_large(self.limit_bytes)
            if inflater is not None:
                inflater.feed(chunk)
            else:
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        if inflater is not None:
            return inflater.finish()
        return b"".join(chunks)


class _Inflater:
    """gzip inflation that refuses to produce more than ``limit_bytes``."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.out: list[bytes] = []
        self.out_bytes = 0
        self._inflate = zlib.decompressobj(GZIP_WBITS)
        self._seen_input = False

    def feed(self, data: bytes) -> None:
        while data:
            self._seen_input = True
            if self._inflate.eof:
                # Concatenated gzip members are one stream (RFC 1952 §2.2).
                data = self._inflate.unused_data + data
                self._inflate = zlib.decompressobj(GZIP_WBITS)
            try:
                piece = self._inflate.decompress(data, self._room())
            except zlib.error as exc:
                raise bad_request(f"the gzip body is corrupt: {exc}") from None
            self._keep(piece)
            data = self._inflate.unconsumed_tail
            if self._inflate.eof and not data:
                data = self._inflate.unused_data
                if data:
                    self._inflate = zlib.decompressobj(GZIP_WBITS)

    def _room(self) -> int:
        # One byte more than allowed, so that going over is seen, never buffered further.
        return min(self.limit_bytes - self.out_bytes + 1, INFLATE_CHUNK_BYTES)

    def _keep(self, piece: bytes) -> None:
        self.out_bytes += len(piece)
        if self.out_bytes > self.limit_bytes:
            raise too_large(self.limit_bytes, "inflated request body")
        self.out.append(piece)

    def finish(self) -> bytes:
        if not self._seen_input:
            return b""
        if not self._inflate.eof:
            raise bad_request("the gzip body is truncated")
        return b"".join(self.out)
