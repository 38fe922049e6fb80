"""metering-engine: an embeddable, actor-based, in-memory usage-metering engine.

    from engine import open_engine, Meter, Event, Query, Take

    async with open_engine("./data", shards=8) as eng:
        await eng.define_meter(Meter(name="api_calls", aggregation="sum"))
        ack = await eng.ingest([Event(...)])
        result = await eng.query(Query(...))
"""

from engine.domain.batch import IngestLimits
from engine.errors import (
    BadFrame,
    BadMessage,
    BatchRejected,
    ConnectionLost,
    DataDirError,
    EngineClosed,
    EventProblem,
    Forbidden,
    InsecureBind,
    InvalidQuery,
    InvalidRequest,
    MeterConflict,
    MeteringError,
    ProtocolError,
    ProtocolTimeout,
    ReplyTooLarge,
    ServerBusy,
    StorageError,
    StorageFull,
    Unauthorized,
    UnknownMeter,
    UnsupportedVersion,
)
from engine.runtime.engine import Engine, EngineStatistics, open_engine
from engine.schema import (
    Alert,
    Event,
    IngestAck,
    Limit,
    Meter,
    Query,
    QueryResult,
    Row,
    Take,
)

__all__ = [
    "Alert",
    "BadFrame",
    "BadMessage",
    "BatchRejected",
    "ConnectionLost",
    "DataDirError",
    "Engine",
    "EngineClosed",
    "EngineStatistics",
    "Event",
    "EventProblem",
    "Forbidden",
    "IngestAck",
    "IngestLimits",
    "InsecureBind",
    "InvalidQuery",
    "InvalidRequest",
    "Limit",
    "Meter",
    "MeterConflict",
    "MeteringError",
    "ProtocolError",
    "ProtocolTimeout",
    "Query",
    "QueryResult",
    "ReplyTooLarge",
    "Row",
    "ServerBusy",
    "StorageError",
    "StorageFull",
    "Take",
    "Unauthorized",
    "UnknownMeter",
    "UnsupportedVersion",
    "open_engine",
]
