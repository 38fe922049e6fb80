"""metering-engine: an embeddable, actor-based, in-memory usage-metering engine.

    from engine import open_engine, Meter, Event, Query, Take

    async with open_engine("./data", shards=8) as eng:
        await eng.define_meter(Meter(name="api_calls", aggregation="sum"))
        ack = await eng.ingest([Event(...)])
        result = await eng.query(Query(...))
"""

from engine.domain.meters import IngestLimits, IngestRules
from engine.errors import (
    BadFrame,
    BadMessage,
    BatchRejected,
    ConnectionLost,
    CustomerExists,
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
    UnknownCustomer,
    UnknownMeter,
    UnsupportedVersion,
)
from engine.pricing import Charge, Invoice, InvoiceLine, Plan, PlanAssignment, Tier, TierAmount
from engine.pricing.engine import PricedEngine as Engine
from engine.pricing.engine import open_engine
from engine.runtime.statistics import EngineStatistics
from engine.schema import (
    Alert,
    Backup,
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
    "Backup",
    "BadFrame",
    "BadMessage",
    "BatchRejected",
    "Charge",
    "ConnectionLost",
    "Customer",
    "CustomerExists",
    "DataDirError",
    "Engine",
    "EngineClosed",
    "EngineStatistics",
    "Event",
    "EventProblem",
    "Forbidden",
    "IngestAck",
    "IngestLimits",
    "IngestRules",
    "InsecureBind",
    "InvalidQuery",
    "InvalidRequest",
    "Invoice",
    "InvoiceLine",
    "Limit",
    "Meter",
    "MeterConflict",
    "MeteringError",
    "Plan",
    "PlanAssignment",
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
    "Tier",
    "TierAmount",
    "Unauthorized",
    "UnknownCustomer",
    "UnknownMeter",
    "UnsupportedVersion",
    "open_engine",
]
