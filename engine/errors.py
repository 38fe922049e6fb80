"""The one exception tree of metering-engine.

Every error the engine raises on purpose is a ``MeteringError``; each carries a
stable wire ``code`` so the TCP server can send it as ``ErrorReply(code, detail)``
and the client can raise the same type again.

    MeteringError
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
    │   ├── Unauthorized            no valid API key was presented
    │   └── UnsupportedVersion      the peers speak different protocol versions
    ├── ServerBusy                  the server refused the connection (too many connections)
    └── ConnectionLost              (client side) the connection closed with requests in flight

Foreign exceptions (lmdb, msgspec, trio) are translated at the layer edges.
"""

from __future__ import annotations

from dataclasses import dataclass


class MeteringError(Exception):
    """Base class of every error raised by metering-engine on purpose."""

    code = "internal"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


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


class Unauthorized(ProtocolError):
    code = "unauthorized"


class UnsupportedVersion(ProtocolError):
    code = "unsupported_version"


class ServerBusy(MeteringError):
    code = "busy"


class ConnectionLost(MeteringError):
    code = "connection_lost"


ERRORS_BY_CODE: dict[str, type[MeteringError]] = {
    cls.code: cls
    for cls in (
        MeteringError,
        InvalidRequest,
        BatchRejected,
        UnknownMeter,
        MeterConflict,
        InvalidQuery,
        UnknownCustomer,
        CustomerExists,
        StorageError,
        DataDirError,
        StorageFull,
        EngineClosed,
        Forbidden,
        ProtocolError,
        Unauthorized,
        UnsupportedVersion,
        ServerBusy,
        ConnectionLost,
    )
}
