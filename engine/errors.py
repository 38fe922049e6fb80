"""The one exception tree of metering-engine.

Shared layer: standard library only (every other layer may import it).

Every error the engine raises on purpose is a ``MeteringError``; each carries a
stable wire ``code`` so the TCP server can send it as ``ErrorReply(code, detail)``
and the client can raise the same type again. Every code the server sends has
a class here, and ``ERRORS_BY_CODE`` is derived from this tree (codes are unique).

    MeteringError                   internal: an unexpected error while handling a request
    ├── InvalidRequest              the caller sent something we refuse; nothing was applied
    │   ├── BatchRejected           one or more events of a batch are bad (index + reason each)
    │   ├── UnknownMeter            a query or event names a meter that was never defined
    │   ├── MeterConflict           a meter is redefined with a different definition
    │   ├── InvalidQuery            bad range, window, time zone, group_by, filter or take
    │   ├── UnknownCustomer         an update names a customer the registry does not have
    │   ├── CustomerExists          an add names a customer that already has a record
    │   └── Forbidden               the API key's scopes or customer do not allow this request
    ├── StorageError                the data directory cannot be used
    │   ├── DataDirError            corrupt, foreign, locked or incompatible data directory
    │   └── StorageFull             the LMDB map or disk is full; the batch was not applied
    ├── EngineClosed                the engine is shutting down or closed
    ├── ProtocolError               the peer broke the wire protocol (bad frame or message)
    │   ├── BadFrame                a frame header is 0 or over the limit; the stream is lost
    │   ├── BadMessage              a complete frame is not a valid message (or a second hello)
    │   ├── ProtocolTimeout         no hello, an unfinished frame or an idle connection in time
    │   ├── ReplyTooLarge           the reply would pass the server's reply limit
    │   ├── Unauthorized            no valid API key was presented
    │   └── UnsupportedVersion      the peers speak different protocol versions
    ├── ServerBusy                  the server refused the connection (too many connections)
    ├── InsecureBind                (server start-up) no API keys on a non-loopback address
    └── ConnectionLost              (client side) the connection closed with requests in flight

Outside the tree, on purpose: ``FrameError`` and ``MessageError``
(``engine.protocol``, internal to the sans-IO layer, which turns them into
``BadFrame``/``BadMessage``), ``LimitError`` and ``WindowError`` (domain
validation, re-raised as ``InvalidRequest``/``InvalidQuery`` by the engine) and
``AuthConfigError`` (a bad key file at start-up, reported by the CLI).

Foreign exceptions (lmdb, msgspec, trio) are translated at the layer edges,
with ``map_exceptions``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

__all__ = [
    "ERRORS_BY_CODE",
    "BadFrame",
    "BadMessage",
    "BatchRejected",
    "ConnectionLost",
    "CustomerExists",
    "DataDirError",
    "EngineClosed",
    "EventProblem",
    "Forbidden",
    "InsecureBind",
    "InvalidQuery",
    "InvalidRequest",
    "MeterConflict",
    "MeteringError",
    "ProtocolError",
    "ProtocolTimeout",
    "ReplyTooLarge",
    "ServerBusy",
    "StorageError",
    "StorageFull",
    "Unauthorized",
    "UnknownCustomer",
    "UnknownMeter",
    "UnsupportedVersion",
    "map_exceptions",
]


class MeteringError(Exception):
    """Base class of every error raised by metering-engine on purpose.

    ``code`` is the class's wire code. ``code=`` overrides it for one instance: a
    client that receives a code this version does not know raises a
    ``ProtocolError`` that still carries the server's code.
    """

    code = "internal"

    def __init__(self, detail: str, *, code: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code


class InvalidRequest(MeteringError):
    code = "invalid_request"


@dataclass(frozen=True, slots=True)
class EventProblem:
    """Why one event of a batch was refused."""

    index: int
    reason: str

    def __str__(self) -> str:
        return f"event {self.index}: {self.reason}"


class BatchRejected(InvalidRequest):
    """A batch contained bad events; the whole batch was refused and nothing applied."""

    code = "batch_rejected"
    MAX_LISTED = 20

    def __init__(self, problems: list[EventProblem]) -> None:
        self.problems = problems
        listed = "; ".join(str(p) for p in problems[: self.MAX_LISTED])
        more = len(problems) - self.MAX_LISTED
        suffix = f"; and {more} more" if more > 0 else ""
        super().__init__(
            f"batch rejected, nothing applied: {len(problems)} bad event(s): {listed}{suffix}"
        )


class UnknownMeter(InvalidRequest):
    code = "unknown_meter"


class MeterConflict(InvalidRequest):
    code = "meter_conflict"


class InvalidQuery(InvalidRequest):
    code = "invalid_query"


class UnknownCustomer(InvalidRequest):
    code = "unknown_customer"


class CustomerExists(InvalidRequest):
    code = "customer_exists"


class Forbidden(InvalidRequest):
    code = "forbidden"


class StorageError(MeteringError):
    code = "storage"


class DataDirError(StorageError):
    code = "data_dir"


class StorageFull(StorageError):
    code = "storage_full"


class EngineClosed(MeteringError):
    code = "closed"


class ProtocolError(MeteringError):
    code = "protocol_error"


class BadFrame(ProtocolError):
    """A frame header says 0 bytes or more than the frame limit: the stream is out of
    sync (an HTTP request, say), so the connection is closed."""

    code = "frame_error"


class BadMessage(ProtocolError):
    """A complete frame that is not a valid message; the stream is still in sync."""

    code = "bad_message"


class ProtocolTimeout(ProtocolError):
    """The peer was too slow: no hello, a started frame not completed, or idle."""

    code = "timeout"


class ReplyTooLarge(ProtocolError):
    """The reply would exceed the server's reply limit; narrow the request."""

    code = "too_large"


class Unauthorized(ProtocolError):
    code = "unauthorized"


class UnsupportedVersion(ProtocolError):
    code = "unsupported_version"


class ServerBusy(MeteringError):
    code = "busy"


class InsecureBind(MeteringError):
    """The server refuses to listen beyond loopback without API keys."""

    code = "insecure_bind"


class ConnectionLost(MeteringError):
    code = "connection_lost"


def _by_code(root: type[MeteringError]) -> dict[str, type[MeteringError]]:
    found: dict[str, type[MeteringError]] = {}
    pending = [root]
    while pending:
        cls = pending.pop()
        if cls.code in found:
            raise AssertionError(f"wire code {cls.code!r} is taken by {found[cls.code].__name__}")
        found[cls.code] = cls
        pending.extend(cls.__subclasses__())
    return found


ERRORS_BY_CODE: dict[str, type[MeteringError]] = _by_code(MeteringError)
"""Wire code -> exception class, for every class of the tree above."""


ErrorFactory = Callable[[Exception], MeteringError]


@contextmanager
def map_exceptions(
    mapping: Mapping[type[Exception], type[MeteringError] | ErrorFactory],
    detail: str = "{error}",
) -> Iterator[None]:
    """Translate foreign exceptions raised in the block into ours, at a layer edge.

    ``mapping`` goes from a foreign exception type to either one of our classes, built
    as ``cls(detail.format(error=exc))``, or a factory called with the foreign
    exception (for errors that need more than a detail, such as ``BatchRejected``).
    The first entry the exception is an instance of wins, so list subclasses before
    their bases. The foreign exception becomes ``__cause__``.

    Left alone: exceptions no entry matches, ``MeteringError`` (already ours) and
    everything that is not an ``Exception`` (``trio.Cancelled``,
    ``KeyboardInterrupt``), which is never swallowed. Works around ``await`` too::

        with map_exceptions({trio.BrokenResourceError: ConnectionLost,
                             trio.ClosedResourceError: ConnectionLost},
                            "sending failed: {error}"):
            await stream.send_all(data)

        with map_exceptions({msgspec.DecodeError: DataDirError},
                            "snapshot unreadable ({error}); " + DAMAGED):
            state = decode_snapshot(raw)

    ``detail`` is a ``str.format`` template with one field, ``error`` (``str`` of the
    foreign exception); double any other braces.
    """
    try:
        yield
    except MeteringError:
        raise
    except Exception as exc:
        for foreign, ours in mapping.items():
            if isinstance(exc, foreign):
                if isinstance(ours, type):
                    raise ours(detail.format(error=exc)) from exc
                raise ours(exc) from exc
        raise
