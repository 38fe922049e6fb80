"""The OpenAPI 3.1 document of every HTTP route, served at ``/openapi.json``.

Shell layer: msgspec and the ``engine.http`` wire types. Schemas come from the
same msgspec structs the routes decode and encode, so the document cannot
drift from the code; exact values (``Decimal``) are JSON numbers on the wire,
so their schema is ``number``, not msgspec's default decimal string.
Every route also answers with a trailing slash (not listed twice).
"""

from __future__ import annotations

from functools import cache
from typing import Any

import msgspec

from engine import Invoice, Plan, PlanAssignment
from engine.http.amberflo import (
    AmberfloMeter,
    AmberfloMeterIn,
    IngestRecord,
    UsageQuery,
    UsageReport,
)
from engine.http.corrections import (
    Amended,
    AmendIn,
    CancelIn,
    Cancelled,
    CancelWhereIn,
    CorrectionList,
)
from engine.http.corrections import openapi_paths as corrections_paths
from engine.http.customers import CustomerIn, CustomerOut, NoCustomer
from engine.http.errors import ErrorBody
from engine.http.events import EventPage
from engine.http.events import openapi_paths as events_paths
from engine.http.explorer import openapi_paths as explorer_paths
from engine.http.limits import AlertPage, CustomerLimits, LimitIn
from engine.http.native import (
    DIMENSIONS_MAX_KEYS,
    DIMENSIONS_MAX_TOP,
    DimensionsOut,
    Health,
    QueryIn,
    QueryOut,
    Ready,
)
from engine.http.openmeter import BATCH, PLAIN, SINGLE, CloudEventDoc
from engine.http.pricing import AssignIn
from engine.http.streams import StatsEvent, StreamToken
from engine.http.webhooks import FailedPage, Redelivered, RedeliverIn
from engine.schema import Limit, Meter

REF = "#/components/schemas/{name}"
# {}: no key is needed when the server has none configured.
SECURITY: list[dict[str, list[str]]] = [{"apiKey": []}, {"bearer": []}, {}]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(name=name)}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _operation(summary: str, ok: dict[str, Any], body: dict[str, Any] | None = None,
               parameters: list[dict[str, Any]] | None = None, secured: bool = True,
               ok_type: str = "application/json") -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "responses": {
            "200": {"description": "success", "content": {ok_type: {"schema": ok}}},
            "default": {"description": "an error", "content": _json(_ref("ErrorBody"))},
        },
    }
    if body is not None:
        operation["requestBody"] = {"required": True, "content": _json(body)}
    if parameters:
        operation["parameters"] = parameters
    operation["security"] = SECURITY if secured else [{}]
    return operation


def _path_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True,
            "schema": {"type": "string", "minLength": 1, "pattern": "^[^/]+$"}}


def _query_param(name: str, schema: dict[str, Any], required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "schema": schema}


def _stream(summary: str, parameters: list[dict[str, Any]]) -> dict[str, Any]:
    """A server-sent event stream: marked ``x-stream`` (it never ends by itself)."""
    token = _query_param("token", {"type": "string"})
    token["description"] = "a token from POST /api/stream-token, instead of a key header"
    operation = _operation(summary, {"type": "string"}, parameters=[*parameters, token],
                           ok_type="text/event-stream")
    operation["x-stream"] = True
    return operation


def _cloudevents() -> dict[str, Any]:
    """OpenMeter ingest: 204 with no body, as OpenMeter answers."""
    one, many = _ref("CloudEventDoc"), {"type": "array", "items": _ref("CloudEventDoc")}
    return {
        "summary": "OpenMeter ingest: one CloudEvent or a batch; each feeds every meter whose "
                   "eventType is its type; idempotent on source + id",
        "requestBody": {"required": True, "content": {
            SINGLE: {"schema": one}, BATCH: {"schema": many},
            PLAIN: {"schema": {"oneOf": [one, many]}}}},
        "responses": {
            "204": {"description": "every event was ingested"},
            "default": {"description": "an error", "content": _json(_ref("ErrorBody"))},
        },
        "security": SECURITY,
    }


def _numbers_for_decimals(node: Any) -> Any:
    if isinstance(node, dict):
        if node.get("type") == "string" and node.get("format") == "decimal":
            return {"type": "number"}
        return {k: _numbers_for_decimals(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_numbers_for_decimals(v) for v in node]
    return node


def _pricing_paths() -> dict[str, Any]:
    """Plans, assignments and invoices (engine.http.pricing)."""
    plans = {"type": "array", "items": _ref("Plan")}
    version = _query_param("version", {"type": "integer", "minimum": 1})
    return {
        "/api/plans": {
            "get": _operation("The latest version of every plan", plans),
            "post": _operation("Define a plan: a new version if it changed; answers it as "
                               "stored", _ref("Plan"), _ref("Plan")),
        },
        "/api/plans/{id}": {
            "get": _operation("A plan (its latest version, or ?version=); 404 if unknown",
                              _ref("Plan"), parameters=[_path_param("id"), version]),
            "put": _operation("Define the plan of this id (the body's id must match)",
                              _ref("Plan"), _ref("Plan"), parameters=[_path_param("id")]),
        },
        "/api/plans/{id}/versions": {"get": _operation(
            "Every version of a plan, oldest first; 404 if unknown", plans,
            parameters=[_path_param("id")])},
        "/api/customers/{id}/plan": {
            "get": _operation("The customer's plan assignments, by start",
                              {"type": "array", "items": _ref("PlanAssignment")},
                              parameters=[_path_param("id")]),
            "post": _operation("Assign a plan from the first period start at or after "
                               "effectiveFromMs (a first plan: from its period's start)",
                               _ref("PlanAssignment"), _ref("AssignIn"),
                               parameters=[_path_param("id")]),
        },
        "/invoices/{customer}": {"get": {**_operation(
            "The invoice of the billing period holding atMs (default: now); format=csv "
            "answers its lines as CSV", _ref("Invoice"), parameters=[
                _path_param("customer"),
                _query_param("atMs", {"type": "integer", "minimum": 0,
                                      "maximum": 253_402_300_799_999}),
                _query_param("format", {"type": "string", "enum": ["json", "csv"]})])}},
    }


def build_document() -> dict[str, Any]:
    types = (IngestRecord, UsageQuery, UsageReport, AmberfloMeterIn, AmberfloMeter, QueryIn,
             QueryOut, DimensionsOut, Health, Ready, ErrorBody, CustomerIn, CustomerOut,
             NoCustomer, Limit, LimitIn, CloudEventDoc, AlertPage, CustomerLimits,
             StreamToken, StatsEvent, FailedPage, RedeliverIn, Redelivered, Meter, Plan,
             PlanAssignment, Invoice, AssignIn, EventPage, CancelIn, CancelWhereIn, AmendIn,
             Cancelled, Amended, CorrectionList)
    _, components = msgspec.json.schema_components(types, ref_template=REF)
    text = {"type": "string"}
    # anyOf, not oneOf: {} (NoCustomer) would also match a customer object.
    customer_or_none = {"anyOf": [_ref("CustomerOut"), _ref("NoCustomer")]}
    records = {"oneOf": [_ref("IngestRecord"), {"type": "array", "items": _ref("IngestRecord")}]}
    paths: dict[str, Any] = {
        "/ingest": {"post": _operation(
            "Ingest one record or an array (gzip or plain); idempotent on uniqueId; the text "
            "'N records were ingested'", text, records, ok_type="text/plain")},
        "/usage": {"post": _operation("One usage report", _ref("UsageReport"),
                                      _ref("UsageQuery"))},
        "/usage/batch": {"post": _operation(
            "Usage reports, in the order of the queries",
            {"type": "array", "items": _ref("UsageReport")},
            {"type": "array", "items": _ref("UsageQuery")})},
        "/usage/all": {"get": _operation(
            "One usage report per meter", {"type": "array", "items": _ref("UsageReport")},
            parameters=[
                _query_param("startTimeInSeconds", {"type": "integer"}, required=True),
                _query_param("endTimeInSeconds", {"type": "integer"}),
                _query_param("timeGroupingInterval", {
                    "type": "string", "enum": ["MINUTE", "HOUR", "DAY", "WEEK", "MONTH"]},
                    required=True),
                _query_param("groupBy", {"type": "string", "enum": ["customerId"]}),
                _query_param("customerId", text),
            ])},
        "/meters": {
            "get": _operation("The meters, in Amberflo's shape",
                              {"type": "array", "items": _ref("AmberfloMeter")},
                              parameters=[_query_param("meterApiName", text)]),
            "post": _operation("Define a meter (idempotent; another aggregation is a 409)",
                               _ref("AmberfloMeter"), _ref("AmberfloMeterIn")),
        },
        "/customers": {
            "get": _operation(
                "Every customer (an array); with customerId, that customer or {} when unknown",
                {"anyOf": [{"type": "array", "items": _ref("CustomerOut")}, customer_or_none]},
                parameters=[_query_param("customerId", {"type": "string", "minLength": 1})]),
            "post": _operation("Add a customer (or fill in one known only by its usage); "
                               "one with a name already is a 409",
                               _ref("CustomerOut"), _ref("CustomerIn")),
            "put": _operation("Replace a customer whole (customerId in the body)",
                              _ref("CustomerOut"), _ref("CustomerIn")),
        },
        "/customers/{id}": {
            "get": _operation("The customer, or {} when unknown", customer_or_none,
                              parameters=[_path_param("id")]),
            "put": _operation("Replace the customer whole", _ref("CustomerOut"),
                              _ref("CustomerIn"), parameters=[_path_param("id")]),
            "delete": _operation("Delete (hide) the customer; answers what it was, 404 if "
                                 "unknown", _ref("CustomerOut"), parameters=[_path_param("id")]),
        },
        "/limits": {
            "get": _operation("The limits (a customer-bound key: those that apply to it)",
                              {"type": "array", "items": _ref("Limit")}),
            "post": _operation("Add (or replace, by id) a limit; exact thresholds",
                               _ref("Limit"), _ref("LimitIn")),
        },
        "/limits/{id}": {"delete": _operation("Remove a limit; answers it, 404 if unknown",
                                              _ref("Limit"), parameters=[_path_param("id")])},
        "/alerts": {"get": _operation(
            "Stored alerts from fromSeq, at most limit of them; nextSeq says where to go on",
            _ref("AlertPage"), parameters=[
                _query_param("fromSeq", {"type": "integer", "minimum": 0}),
                _query_param("limit", {"type": "integer", "minimum": 1, "maximum": 1000})])},
        "/alerts/stream": {"get": _stream(
            "Server-sent events, one per alert (id: its seq), from Last-Event-ID + 1, "
            "fromSeq, or the next alert", [
                _query_param("fromSeq", {"type": "integer", "minimum": 0}),
                {"name": "Last-Event-ID", "in": "header", "required": False,
                 "schema": {"type": "string", "pattern": "^[0-9]+$"}}])},
        "/webhooks/failed": {"get": _operation(
            "Alert webhooks parked after their retry time; 404 on a server without webhooks",
            _ref("FailedPage"))},
        "/webhooks/redeliver": {"post": _operation(
            "Try parked alert webhooks again: all, or those of url and/or seq (an empty body "
            "is all); answers those taken", _ref("Redelivered"), _ref("RedeliverIn"))},
        "/api/customers/{id}/limits": {"get": _operation(
            "Each limit that applies to the customer: its current period, usage and thresholds",
            _ref("CustomerLimits"), parameters=[_path_param("id")])},
        "/api/stats/stream": {"get": _stream(
            "Server-sent events: the engine's ingest counters and rate, once a second "
            "(data: StatsEvent)", [])},
        "/api/stream-token": {"post": _operation(
            "A short-lived token for ?token= on the streams, with this key's scopes and "
            "customer", _ref("StreamToken"))},
        "/api/query": {"post": _operation(
            "The engine's own query; take.offset pages through the ranked groups, other: true "
            "adds the exact aggregate of every group outside the page", _ref("QueryOut"),
            _ref("QueryIn"))},
        "/api/meters/{name}/dimensions": {"get": _operation(
            "The dimension keys seen on the meter's events in [startMs, endMs) (default: the "
            "30 UTC days up to today), each with its top values by usage; 404 if the meter "
            "is unknown", _ref("DimensionsOut"), parameters=[
                _path_param("name"),
                _query_param("startMs", {"type": "integer", "minimum": 0}),
                _query_param("endMs", {"type": "integer", "minimum": 0}),
                _query_param("top", {"type": "integer", "minimum": 1,
                                     "maximum": DIMENSIONS_MAX_TOP}),
                _query_param("maxKeys", {"type": "integer", "minimum": 1,
                                         "maximum": DIMENSIONS_MAX_KEYS})])},
        **_pricing_paths(),
        "/api/v1/events": {"post": _cloudevents()},
        "/healthz": {"get": _operation("The process is up", _ref("Health"), secured=False)},
        "/readyz": {"get": _operation("Recovery has ended; requests are served",
                                      _ref("Ready"), secured=False)},
        "/metrics": {"get": _operation("Prometheus text format", text, ok_type="text/plain")},
        "/openapi.json": {"get": _operation("This document", {"type": "object"},
                                            secured=False)},
        **explorer_paths(),
        **events_paths(),
        **corrections_paths(),
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "metering-engine HTTP API", "version": "1",
                 "description": "Amberflo-compatible and native routes; see docs/http.md. "
                                "Every route also answers with a trailing slash."},
        "paths": paths,
        "components": {
            "schemas": _numbers_for_decimals(components),
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-KEY"},
                "bearer": {"type": "http", "scheme": "bearer"},
            },
        },
    }


@cache
def openapi_document() -> bytes:
    return msgspec.json.encode(build_document())
