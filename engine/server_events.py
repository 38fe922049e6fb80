"""The TCP server's ``read_events`` request: pages of the raw-event log.

Shell layer, like ``engine.server_connection`` (whose ``REQUEST_HANDLERS`` names this
handler). A key bound to a customer reads only that customer's events: asking for
another customer is ``forbidden``, asking for none means its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from engine.auth import Principal
from engine.errors import Forbidden
from engine.protocol.messages import EventsReply, ReadEvents

if TYPE_CHECKING:
    from engine.server_connection import ServerSideConnection


async def read_events(connection: ServerSideConnection, principal: Principal,
                      message: ReadEvents) -> msgspec.Struct:
    customer_id = message.customer_id
    if principal.customer_id is not None:
        if customer_id not in (None, principal.customer_id):
            raise Forbidden("this API key may only read its own customer's events")
        customer_id = principal.customer_id
    page = await connection.server.engine.raw_events(
        message.start_ms, message.end_ms, meter_api_name=message.meter_api_name,
        customer_id=customer_id, from_lsn=message.from_lsn, from_index=message.from_index,
        limit=message.limit)
    return EventsReply(id=message.id, events=page.events, next_lsn=page.next_lsn,
                       next_index=page.next_index, done=page.done)
