"""The TCP server's customer requests: the registry's calls behind the request table.

Shell layer, like ``engine.server_connection`` (whose ``REQUEST_HANDLERS`` names
these handlers). A key bound to a customer may read, add, change and delete only
that customer's record, and lists only it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from engine.auth import Principal
from engine.errors import Forbidden
from engine.protocol.messages import (
    AddCustomer,
    CustomerReply,
    CustomersReply,
    DeleteCustomer,
    GetCustomer,
    ListCustomers,
    UpdateCustomer,
)

if TYPE_CHECKING:
    from engine.server_connection import ServerSideConnection


def _own(principal: Principal, customer_id: str) -> None:
    if principal.customer_id is not None and customer_id != principal.customer_id:
        raise Forbidden("this API key may only touch its own customer")


async def add_customer(connection: ServerSideConnection, principal: Principal,
                       message: AddCustomer) -> msgspec.Struct:
    _own(principal, message.customer.id)
    stored = await connection.server.engine.add_customer(message.customer)
    return CustomerReply(id=message.id, customer=stored)


async def update_customer(connection: ServerSideConnection, principal: Principal,
                          message: UpdateCustomer) -> msgspec.Struct:
    _own(principal, message.customer.id)
    stored = await connection.server.engine.update_customer(message.customer)
    return CustomerReply(id=message.id, customer=stored)


async def get_customer(connection: ServerSideConnection, principal: Principal,
                       message: GetCustomer) -> msgspec.Struct:
    _own(principal, message.customer_id)
    found = await connection.server.engine.get_customer(message.customer_id)
    return CustomerReply(id=message.id, customer=found)


async def list_customers(connection: ServerSideConnection, principal: Principal,
                         message: ListCustomers) -> msgspec.Struct:
    engine = connection.server.engine
    if principal.customer_id is not None:
        own = await engine.get_customer(principal.customer_id)
        return CustomersReply(id=message.id, customers=[own] if own is not None else [])
    return CustomersReply(id=message.id, customers=await engine.list_customers())


async def delete_customer(connection: ServerSideConnection, principal: Principal,
                          message: DeleteCustomer) -> msgspec.Struct:
    _own(principal, message.customer_id)
    deleted = await connection.server.engine.delete_customer(message.customer_id)
    return CustomerReply(id=message.id, customer=deleted)
