"""metering-engine: an embeddable, actor-based, in-memory usage-metering engine.

    from engine import open_engine, Meter, Event, Query, Take

    async with open_engine("./data", shards=8) as eng:
        await eng.define_meter(Meter(name="api_calls", aggregation="sum"))
        ack = await eng.ingest([Event(...)])
        result = await eng.query(Query(...))
"""

from engine.domain.meters import IngestLimits, IngestRules
from engine.errors import (
    BatchRejected,
    CustomerExists,
    DataDirError,
    EngineClosed,
    EventProblem,
    InvalidQuery,
    InvalidRequest,
    MeterConflict,
    MeteringError,
    StorageError,
    StorageFull,
    UnknownCustomer,
    UnknownMeter,
)
from engine.runtime.engine import Engine, EngineStatistics, open_engine
from engine.schema import (
    Alert,
    Customer,
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
    "BatchRejected",
    "Customer",
    "CustomerExists",
    "DataDirError",
    "Engine",
    "EngineClosed",
    "EngineStatistics",
    "Event",
    "EventProblem",
    "IngestAck",
    "IngestLimits",
    "IngestRules",
    "InvalidQuery",
    "InvalidRequest",
    "Limit",
    "Meter",
    "MeterConflict",
    "MeteringError",
    "Query",
    "QueryResult",
    "Row",
    "StorageError",
    "StorageFull",
    "Take",
    "UnknownCustomer",
    "UnknownMeter",
    "open_engine",
]
