"""HTTP errors: the engine's exception tree mapped to statuses, in one place.

Shell layer: imports ``engine.errors`` and msgspec only. Every error response
is JSON ``{"error": detail, "code": code, "problems": [{"index", "reason"}]?}``
(the Amberflo SDKs never parse error bodies; the TypeScript SDK's mocks use
``{"error": "..."}``). Invariants: a 4xx other than 429 means "permanent, do
not retry" to the Amberflo batching producer, and 429/5xx mean "retry the
same batch", so only conditions that a retry can cure map to 429 or 5xx.
"""

from __future__ import annotations

import msgspec

from engine.errors import (
    BatchRejected,
    CustomerExists,
    DataDirError,
    EngineClosed,
    Forbidden,
    InvalidQuery,
    InvalidRequest,
    MeterConflict,
    MeteringError,
    ProtocolError,
    ServerBusy,
    StorageError,
    StorageFull,
    Unauthorized,
    UnknownCustomer,
    UnknownMeter,
)

# Most specific first: the first class an exception is an instance of decides.
STATUS_BY_ERROR: tuple[tuple[type[MeteringError], int], ...] = (
    (BatchRejected, 400),
    (UnknownMeter, 404),
    (MeterConflict, 409),
    (CustomerExists, 409),
    (UnknownCustomer, 404),
    (InvalidQuery, 400),
    (Forbidden, 403),
    (InvalidRequest, 400),
    (StorageFull, 507),  # the batch was not applied; space may come back: retryable
    (DataDirError, 500),
    (StorageError, 500),
    (EngineClosed, 503),
    (Unauthorized, 401),
    (ProtocolError, 400),
    (ServerBusy, 503),
    (MeteringError, 500),
)
RETRY_AFTER_SECONDS = 1


class Problem(msgspec.Struct, frozen=True):
    """Why one record of a request was refused (``index`` counts from 0)."""

    index: int
    reason: str


class ErrorBody(msgspec.Struct, frozen=True, omit_defaults=True):
    error: str
    code: str
    problems: list[Problem] | None = None


class HttpError(Exception):
    """An error answer of the HTTP layer itself (bad JSON, size limits, auth, routing)."""

    def __init__(self, status: int, code: str, detail: str,
                 problems: list[Problem] | None = None,
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.problems = problems
        self.headers = headers or []

    def body(self) -> ErrorBody:
        return ErrorBody(error=self.detail, code=self.code, problems=self.problems)


def status_of(error: MeteringError) -> int:
    for cls, status in STATUS_BY_ERROR:
        if isinstance(error, cls):
            return status
    return 500  # pragma: no cover - MeteringError is the last entry


def from_engine_error(error: MeteringError) -> HttpError:
    """The HTTP answer for an engine error, with each bad record of a rejected batch."""
    problems = None
    if isinstance(error, BatchRejected):
        problems = [Problem(p.index, p.reason) for p in error.problems]
    status = status_of(error)
    headers = []
    if status in (503, 507):
        headers.append((b"retry-after", str(RETRY_AFTER_SECONDS).encode()))
    return HttpError(status, error.code, error.detail, problems, headers)


def bad_request(detail: str, problems: list[Problem] | None = None,
                code: str = "invalid_request") -> HttpError:
    return HttpError(400, code, detail, problems)
