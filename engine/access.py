"""What a customer-bound API key may see: the one place both shells (TCP and HTTP) ask.

Pure: the standard library, msgspec, ``engine.schema`` and ``engine.errors``. A key
bound to a customer (``Principal.customer_id``) may only query that customer's
usage and only see limits that name no other customer; these functions narrow
a request accordingly, or refuse it with ``Forbidden``.
"""

from __future__ import annotations

import msgspec

from engine.errors import Forbidden
from engine.schema import Limit, Query


def restrict_query(query: Query, customer_id: str | None) -> Query:
    """``query`` narrowed to ``customer_id`` (unchanged for an unbound key)."""
    if customer_id is None:
        return query
    allowed = query.filter.get("customer_id")
    if allowed is not None and set(allowed) - {customer_id}:
        raise Forbidden("this API key may only query its own customer's usage")
    return msgspec.structs.replace(query, filter={**query.filter, "customer_id": [customer_id]})


def visible_limits(limits: list[Limit], customer_id: str) -> list[Limit]:
    """The limits a key bound to ``customer_id`` may see, naming no other customer."""
    visible = []
    for limit in limits:
        if limit.customer_id not in (None, customer_id):
            continue
        allowed = limit.filter.get("customer_id")
        if allowed is not None:
            if customer_id not in allowed:
                continue
            limit = msgspec.structs.replace(
                limit, filter={**limit.filter, "customer_id": [customer_id]})
        visible.append(limit)
    return visible
