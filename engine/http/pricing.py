"""Pricing routes: plan CRUD, assignments and invoices (JSON or CSV) (docs/pricing.md).

Shell layer: the engine's public API (``Plan``, ``Invoice``, ``Engine``'s pricing
calls), ``engine.errors`` and ``engine.http``. Money is an exact JSON number
(``0.1`` is 0.1), never a float.

- ``GET /api/plans``, ``POST /api/plans`` (define: a new version if it changed),
  ``GET /api/plans/{id}`` (``?version=``; 404 if unknown), ``PUT /api/plans/{id}``,
  ``GET /api/plans/{id}/versions``. Plans are never deleted: invoices name the
  versions they used.
- ``GET /api/customers/{id}/plan``: the customer's assignments;
  ``POST /api/customers/{id}/plan`` with ``{"planId", "effectiveFromMs"}`` assigns.
- ``GET /invoices/{customer}?atMs=`` (default: now): the invoice of the period
  holding ``atMs``; ``&format=csv`` answers its lines as CSV. A customer-bound key
  sees only its own.
"""

from __future__ import annotations

import msgspec

from engine import Plan, PlanAssignment
from engine.errors import Forbidden
from engine.http.app import Request, Response, Router, json_response
from engine.http.codecs import decode_json
from engine.http.errors import HttpError, bad_request


class AssignIn(msgspec.Struct, rename="camel"):
    plan_id: str
    effective_from_ms: int


def _int_param(request: Request, name: str) -> int | None:
    text = request.param(name)
    if text is None:
        return None
    if not text.isdigit() or len(text) > 18:
        raise bad_request(f"{name} must be a non-negative integer, got {text!r}")
    return int(text)


def _visible(request: Request, customer_id: str) -> None:
    bound = request.principal.customer_id
    if bound is not None and bound != customer_id:
        raise Forbidden("this API key may only see its own customer's pricing")


async def list_plans(request: Request) -> Response:
    return json_response(request.engine.plans())


async def define_plan(request: Request) -> Response:
    plan = decode_json(await request.body(), Plan, "plan")
    return json_response(await request.engine.define_plan(plan))


async def put_plan(request: Request) -> Response:
    plan = decode_json(await request.body(), Plan, "plan")
    plan_id = request.path_params["id"]
    if plan.id != plan_id:
        raise bad_request(f"plan id {plan.id!r} in the body is not the path's {plan_id!r}")
    return json_response(await request.engine.define_plan(plan))


def _known_plan(request: Request, version: int | None = None) -> Plan:
    plan_id = request.path_params["id"]
    plan = request.engine.get_plan(plan_id, version)
    if plan is None:
        raise HttpError(404, "unknown_plan", f"no plan {plan_id!r}"
                        + ("" if version is None else f" version {version}"))
    return plan


async def get_plan(request: Request) -> Response:
    return json_response(_known_plan(request, _int_param(request, "version")))


async def plan_versions(request: Request) -> Response:
    _known_plan(request)
    return json_response(request.engine.plan_versions(request.path_params["id"]))


async def customer_plan(request: Request) -> Response:
    customer_id = request.path_params["id"]
    _visible(request, customer_id)
    assignments: list[PlanAssignment] = request.engine.plan_assignments(customer_id)
    return json_response(assignments)


async def assign_plan(request: Request) -> Response:
    body = decode_json(await request.body(), AssignIn, "assignment")
    return json_response(await request.engine.assign_plan(
        request.path_params["id"], body.plan_id, effective_from_ms=body.effective_from_ms))


async def invoice(request: Request) -> Response:
    customer_id = request.path_params["customer"]
    _visible(request, customer_id)
    at_ms = _int_param(request, "atMs")
    found = await request.engine.invoice(
        customer_id, request.app.clock_ms() if at_ms is None else at_ms)
    fmt = (request.param("format") or "json").lower()
    if fmt == "csv":
        return Response(200, found.csv().encode(), content_type=b"text/csv; charset=utf-8")
    if fmt != "json":
        raise bad_request(f"format must be json or csv, got {fmt!r}")
    return json_response(found)


def add_routes(router: Router) -> None:
    router.add("GET", "/api/plans", list_plans, "query")
    router.add("POST", "/api/plans", define_plan, "admin")
    router.add("GET", "/api/plans/{id}", get_plan, "query")
    router.add("PUT", "/api/plans/{id}", put_plan, "admin")
    router.add("GET", "/api/plans/{id}/versions", plan_versions, "query")
    router.add("GET", "/api/customers/{id}/plan", customer_plan, "query")
    router.add("POST", "/api/customers/{id}/plan", assign_plan, "admin")
    router.add("GET", "/invoices/{customer}", invoice, "query")
