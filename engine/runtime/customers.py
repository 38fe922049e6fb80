"""The customer registry's calls: add, update, get, list, delete.

Runtime layer: the catalog (read), the shard mailboxes (to ask which customers
have usage) and the WAL writer (every change is a WAL record, settled in commit
order and replayed on restart). Owns nothing: records live in the ``Catalog``,
usage in the shards.

A customer is in the registry when it has a record (added or updated) or usage
(an event arrived for it, with no name yet), and is not deleted. Deleting hides
it: its usage is still metered, and adding it again reinstates it.
"""

from __future__ import annotations

import builtins
from collections.abc import Awaitable, Callable
from typing import Literal

import msgspec
import trio

from engine.domain import records
from engine.domain.batch import ShardRouter
from engine.domain.customers import check_customer
from engine.domain.meters import IngestRules
from engine.errors import InvalidRequest
from engine.runtime import messages
from engine.runtime.catalog import Catalog
from engine.runtime.lifecycle import Lifecycle, closed_channel_is_closed_engine
from engine.schema import Customer

Submit = Callable[[messages.WriteRequest], Awaitable[None]]


class CustomerRegistry:
    def __init__(self, catalog: Catalog, route: ShardRouter, rules: IngestRules,
                 mailboxes: list[trio.MemorySendChannel[messages.ShardMessage]],
                 lifecycle: Lifecycle, submit: Submit, clock_ms: Callable[[], int]) -> None:
        self._catalog = catalog
        self._route = route
        self._rules = rules
        self._mailboxes = mailboxes
        self._lifecycle = lifecycle
        self._submit = submit
        self._clock_ms = clock_ms

    async def add(self, customer: Customer) -> Customer:
        """Add a customer, fill in one known only by its usage, or reinstate a deleted one.

        Raises ``CustomerExists`` if it already has a record with a name.
        """
        return await self._put(customer, "add")

    async def update(self, customer: Customer) -> Customer:
        """Replace a customer's record whole. Raises ``UnknownCustomer`` if it is not known."""
        return await self._put(customer, "update")

    async def get(self, customer_id: str) -> Customer | None:
        _check_id(customer_id)
        if customer_id in self._catalog.hidden_customers:
            return None
        record = self._catalog.customers.get(customer_id)
        if record is not None:
            return record
        return Customer(id=customer_id) if await self._has_usage(customer_id) else None

    async def list(self) -> builtins.list[Customer]:
        """Every customer in the registry, by id."""
        catalog = self._catalog
        with_usage = await self._find(None, range(len(self._mailboxes)))
        ids = (with_usage | catalog.customers.keys()) - catalog.hidden_customers
        return [catalog.customers.get(cid) or Customer(id=cid) for cid in sorted(ids)]

    async def delete(self, customer_id: str) -> Customer | None:
        """Hide a customer; returns what it was, or None if it was not in the registry."""
        existing = await self.get(customer_id)
        if existing is None:
            return None
        now_ms = self._clock_ms()
        ticket = messages.LoggedTicket(now_ms)
        record = records.encode(records.WalHideCustomer(customer_id, now_ms))
        await self._submit(messages.LogCustomerChange(
            ticket, record, messages.HideCustomer(customer_id)))
        return existing if ticket.removed else None

    # ---------------------------------------------------------------- inside

    async def _put(self, customer: Customer, mode: Literal["add", "update"]) -> Customer:
        checked = check_customer(customer, self._rules)
        known = self._catalog.customer_record(checked.id)
        known_by_usage = known is None and await self._has_usage(checked.id)
        now_ms = self._clock_ms()
        # A visible record keeps its creation time; a new or reinstated one starts now.
        created_ms = known.created_ms if known is not None else now_ms
        stored = msgspec.structs.replace(checked, created_ms=created_ms, updated_ms=now_ms)
        change = messages.PutCustomer(stored, mode, known_by_usage)
        record = records.encode(records.WalPutCustomer(stored, now_ms))
        await self._submit(messages.LogCustomerChange(messages.LoggedTicket(now_ms), record,
                                                      change))
        return stored

    async def _has_usage(self, customer_id: str) -> bool:
        return bool(await self._find([customer_id], [self._route(customer_id)]))

    async def _find(self, ids: builtins.list[str] | None, shards: range | builtins.list[int],
                    ) -> set[str]:
        self._lifecycle.check_open()
        ticket: messages.GatherTicket[set[str]] = messages.GatherTicket(len(shards))
        with self._lifecycle.waiting(ticket):
            with closed_channel_is_closed_engine():
                for shard in shards:
                    await self._mailboxes[shard].send(messages.FindCustomers(ids, ticket))
            await ticket.wait()
        return set().union(*ticket.results)


def _check_id(customer_id: object) -> None:
    if type(customer_id) is not str or not customer_id:
        raise InvalidRequest(f"a customer id must be a non-empty string, got {customer_id!r:.60}")
