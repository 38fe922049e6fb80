"""The Amberflo customer routes: ``/customers`` and ``/customers/{id}``, on the
engine's durable customer registry (docs/http.md has the mapping).

Shell layer: the engine's public API (``Customer``, ``Engine``'s customer calls),
``engine.errors`` and ``engine.http``. The registry lives in the engine (WAL,
snapshots); this module only translates Amberflo's JSON to ``Customer`` and back.

Invariants:

- A read of one customer answers 200 with the customer object, or ``{}`` when
  it is unknown, never 404: the SDK's ``add_or_update`` reads first and tests
  ``"customerId" in answer``.
- ``POST`` adds (or fills in a customer known only by its usage: 200); a
  customer that already has a name is a 409. ``PUT`` replaces the record whole
  (absent ``traits`` -> none). ``DELETE`` answers the deleted customer; an
  unknown one is a 404 (the SDK has no delete call to break).
- Amberflo's ``address``, ``lifecycleStage``, ``description`` and ``test`` are
  kept in ``Customer.extra`` under those names and answered back as fields.
- A customer-bound key sees only its own customer (a list of at most one; a
  read of another is a 403) and can change nothing (such keys are never admin).
"""

from __future__ import annotations

from typing import Any

import msgspec

from engine import Customer
from engine.errors import Forbidden, UnknownCustomer
from engine.http.app import Request, Response, Router, json_response
from engine.http.codecs import decode_json
from engine.http.errors import bad_request

EXTRA_FIELDS = ("address", "lifecycleStage", "description", "test")


class Address(msgspec.Struct, rename="camel", omit_defaults=True):
    line1: str | None = None
    line2: str | None = None
    city: str | None = None
    state: str | None = None
    country: str | None = None
    postal_code: str | None = None


class CustomerIn(msgspec.Struct, rename="camel", omit_defaults=True):
    """Amberflo's customer payload (``create_customer_payload`` plus the docs' fields)."""

    customer_name: str
    customer_id: str | None = None  # required, but may come from the path instead
    customer_email: str | None = None
    enabled: bool | None = None
    traits: dict[str, str] | None = None
    address: Address | None = None
    lifecycle_stage: str | None = None
    description: str | None = None
    test: bool | None = None


class CustomerOut(msgspec.Struct, rename="camel", omit_defaults=True):
    """A customer as Amberflo answers it (``id`` equals ``customerId``; times in ms)."""

    id: str
    customer_id: str
    enabled: bool
    create_time: int
    update_time: int
    customer_name: str | None = None  # None: known only by its usage so far
    customer_email: str | None = None
    traits: dict[str, str] | None = None
    address: Address | None = None
    lifecycle_stage: str | None = None
    description: str | None = None
    test: bool | None = None


class NoCustomer(msgspec.Struct):
    """``{}``: what Amberflo answers for an unknown customer."""


def to_customer(body: CustomerIn, customer_id: str) -> Customer:
    extra: dict[str, Any] = {}
    if body.address is not None:
        extra["address"] = msgspec.to_builtins(body.address)
    for name, value in (("lifecycleStage", body.lifecycle_stage),
                        ("description", body.description), ("test", body.test)):
        if value is not None:
            extra[name] = value
    enabled = True if body.enabled is None else body.enabled
    return Customer(id=customer_id, name=body.customer_name, email=body.customer_email,
                    traits=body.traits or {}, enabled=enabled, extra=extra)


def to_amberflo(customer: Customer) -> CustomerOut:
    extra = customer.extra
    address = extra.get("address")
    stage = extra.get("lifecycleStage")
    description = extra.get("description")
    test = extra.get("test")
    return CustomerOut(
        id=customer.id, customer_id=customer.id, enabled=customer.enabled,
        create_time=customer.created_ms, update_time=customer.updated_ms,
        customer_name=customer.name, customer_email=customer.email,
        traits=dict(customer.traits) if customer.traits else None,
        address=msgspec.convert(address, Address) if isinstance(address, dict) else None,
        lifecycle_stage=stage if isinstance(stage, str) else None,
        description=description if isinstance(description, str) else None,
        test=test if isinstance(test, bool) else None)


def _visible(request: Request, customer_id: str) -> None:
    bound = request.principal.customer_id
    if bound is not None and customer_id != bound:
        raise Forbidden("this API key may only see its own customer")


async def _one(request: Request, customer_id: str) -> Response:
    _visible(request, customer_id)
    if not customer_id:
        raise bad_request("customerId must not be empty")
    found = await request.engine.get_customer(customer_id)
    return json_response(to_amberflo(found) if found is not None else NoCustomer())


async def list_or_get(request: Request) -> Response:
    wanted = request.param("customerId")
    if wanted is not None:
        return await _one(request, wanted)
    customers = await request.engine.list_customers()
    bound = request.principal.customer_id
    if bound is not None:
        customers = [c for c in customers if c.id == bound]
    return json_response([to_amberflo(c) for c in customers])


async def get_one(request: Request) -> Response:
    return await _one(request, request.path_params["id"])


def _payload(body: CustomerIn, path_id: str | None) -> Customer:
    if path_id is not None and body.customer_id not in (None, path_id):
        raise bad_request(f"customerId {body.customer_id!r} in the body is not the path's "
                          f"{path_id!r}")
    customer_id = path_id if path_id is not None else body.customer_id
    if not customer_id:
        raise bad_request("customerId is required")
    return to_customer(body, customer_id)


async def add(request: Request) -> Response:
    body = decode_json(await request.body(), CustomerIn, "customer")
    customer = _payload(body, None)
    _visible(request, customer.id)
    return json_response(to_amberflo(await request.engine.add_customer(customer)))


async def _replace(request: Request, path_id: str | None) -> Response:
    body = decode_json(await request.body(), CustomerIn, "customer")
    customer = _payload(body, path_id)
    _visible(request, customer.id)
    return json_response(to_amberflo(await request.engine.update_customer(customer)))


async def replace(request: Request) -> Response:
    return await _replace(request, None)


async def replace_one(request: Request) -> Response:
    return await _replace(request, request.path_params["id"])


async def delete_one(request: Request) -> Response:
    customer_id = request.path_params["id"]
    _visible(request, customer_id)
    deleted = await request.engine.delete_customer(customer_id)
    if deleted is None:
        raise UnknownCustomer(f"unknown customer {customer_id!r}")
    return json_response(to_amberflo(deleted))


def add_routes(router: Router) -> None:
    router.add("GET", "/customers", list_or_get, "query")
    router.add("POST", "/customers", add, "admin")
    router.add("PUT", "/customers", replace, "admin")
    router.add("GET", "/customers/{id}", get_one, "query")
    router.add("PUT", "/customers/{id}", replace_one, "admin")
    router.add("DELETE", "/customers/{id}", delete_one, "admin")
