"""One client connection of the TCP server: its reader, writer and request tasks.

Shell layer: trio, ``engine.protocol``, ``engine.auth``, ``engine.errors`` and
the schema; the server (``engine.server``) starts one ``ServerSideConnection``
per accepted stream and owns the engine, the config and the request budget.

Invariants:

- Protocol decisions are the ``ServerConnection``'s (engine.protocol.connection);
  this module only moves bytes, keeps the timeouts and charges the budget.
- A frame is charged to the server-wide request budget before its body is
  buffered (or, if it arrived in one piece, before it is decoded), and the
  charge is released when the request is answered; unsent reply bytes are
  charged until written.
- At most ``max_in_flight`` requests run at once; each holds its slot until its
  reply is queued. Every request type has one row in ``REQUEST_HANDLERS``.
- A customer-bound key sees and touches only its customer's data.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import msgspec
import trio

from engine import server_customers, server_events
from engine.access import restrict_query, visible_limits
from engine.auth import Principal
from engine.errors import (
    Forbidden,
    InvalidRequest,
    MeteringError,
    ProtocolTimeout,
    Unauthorized,
)
from engine.protocol.connection import (
    NEED_DATA,
    RemoteProtocolError,
    ServerConnection,
    error_reply,
)
from engine.protocol.messages import (
    PROTOCOL_VERSION,
    AddCustomer,
    AddLimit,
    AlertsPush,
    Amend,
    AssignmentReply,
    AssignPlan,
    BackupReply,
    BackupRequest,
    Cancel,
    CancelledReply,
    CancelWhere,
    CorrectionsReply,
    DefineMeter,
    DefinePlan,
    DeleteCustomer,
    GetCustomer,
    GetInvoice,
    GetPlan,
    Ingest,
    IngestReply,
    InvoiceReply,
    Lagged,
    LimitReply,
    LimitsReply,
    ListCorrections,
    ListCustomers,
    ListLimits,
    ListMeters,
    ListPlans,
    MeterReply,
    MetersReply,
    Ping,
    PlanReply,
    PlansReply,
    Pong,
    QueryReply,
    QueryRequest,
    ReadEvents,
    RemovedReply,
    RemoveLimit,
    Stats,
    StatsReply,
    Subscribe,
    Subscribed,
    Unsubscribe,
    Unsubscribed,
    UpdateCustomer,
    Welcome,
)

if TYPE_CHECKING:
    from engine.server import MeterServer

__all__ = ["REQUEST_HANDLERS", "REQUIRED_SCOPE", "RequestHandler", "ServerSideConnection"]

# The server's logger, as before this class had its own module: one name to configure.
log = logging.getLogger("engine.server")

SERVER_NAME = "metering-engine"
RECEIVE_CHUNK_BYTES = 256 * 1024
# A decoded request takes several times its wire size in memory (an event of ~100 bytes
# of msgpack is a struct, a dict and strings): the request budget counts this multiple.
REQUEST_MEMORY_FACTOR = 4
MAX_SUBSCRIPTIONS = 16  # per connection
PUSH_BATCH = 256  # alerts per push frame at most
LAG_NOTICE = 10_000  # alerts behind before a subscriber is told it lags


class _Closing(Exception):
    """Internal: close this connection after the error frame was sent."""


class ServerSideConnection:
    """The tasks of one accepted connection (see the module docstring)."""

    def __init__(self, server: MeterServer, stream: trio.abc.Stream) -> None:
        self.server = server
        self.config = server.config
        self.stream = stream
        # The protocol state: until the hello is through, frames are small, and they are
        # not charged to the request budget (a client that has not authenticated must not
        # be able to hold it).
        self.protocol = ServerConnection(max_frame_bytes=self.config.max_frame_bytes,
                                         max_reply_bytes=self.config.max_reply_bytes)
        self.principal: Principal | None = None
        self.slots = trio.Semaphore(self.config.max_in_flight)
        self.nursery: trio.Nursery | None = None
        self.subscriptions: dict[int, trio.CancelScope] = {}
        self.charged_bytes = 0  # of the server's request budget, for the frame being read
        self.outgoing_send, self.outgoing_receive = trio.open_memory_channel[bytes](
            self.config.max_in_flight
        )

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            nursery.start_soon(self._writer, nursery.cancel_scope)
            with trio.CancelScope() as reader_scope:
                self.server._reader_scopes.add(reader_scope)
                if self.server._draining.is_set():
                    reader_scope.cancel()
                try:
                    await self._reader(nursery)
                except _Closing:
                    pass
                finally:
                    self.server._reader_scopes.discard(reader_scope)
                    # A frame cut short (timeout, close, shutdown) gives its budget back.
                    self.server.request_budget.release(self.charged_bytes)
                    self.charged_bytes = 0
            # Reader is done: stop pushing alerts, let running requests finish, then flush
            # and stop the writer.
            for scope in self.subscriptions.values():
                scope.cancel()
            for _ in range(self.config.max_in_flight):
                await self.slots.acquire()
            await self.outgoing_send.aclose()

    async def _writer(self, connection_scope: trio.CancelScope) -> None:
        budget = self.server.request_budget
        async with self.outgoing_receive:
            try:
                async for frame in self.outgoing_receive:
                    try:
                        with trio.move_on_after(self.config.send_timeout_s) as timeout:
                            await self.stream.send_all(frame)
                    finally:
                        budget.release(len(frame))
                    if timeout.cancelled_caught:
                        log.info("closing a connection that does not read its replies")
                        connection_scope.cancel()
                        return
            finally:
                # Replies that will never be sent give their bytes back.
                while True:
                    try:
                        budget.release(len(self.outgoing_receive.receive_nowait()))
                    except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                        break

    async def _queue(self, frame: bytes) -> None:
        """Queue a frame for the writer. Unsent reply bytes count against the server-wide
        request budget, so clients that do not read their replies slow everyone's
        reading of new requests instead of growing the server's memory."""
        self.server.request_budget.charge(len(frame))
        try:
            await self.outgoing_send.send(frame)
        except BaseException:
            self.server.request_budget.release(len(frame))
            raise

    async def _send(self, message: msgspec.Struct) -> None:
        await self._queue(self.protocol.send(message))

    async def _close_with(self, error: MeteringError, request_id: int | None = None) -> NoReturn:
        """Tell the peer why, then close the connection (once the error frame is written)."""
        self.server._counters.protocol_errors += 1
        await self._queue(self.protocol.refuse(error, request_id))
        raise _Closing

    async def _next_frame(self, timeout_s: float, idle_check: bool = True) -> bytes | None:
        """The next frame, or ``None`` when the peer closed cleanly between frames."""
        deadline = trio.current_time() + timeout_s
        while True:
            try:
                frame = self.protocol.next_frame()
            except RemoteProtocolError as exc:
                await self._close_with(exc.error, exc.request_id)
            if frame is not NEED_DATA:
                return frame
            pending = self.protocol.pending_frame_bytes
            if pending and not self.charged_bytes and self.principal is not None:
                # Budget first, body second: a frame body is buffered only when the
                # server-wide budget has room for it (not timed: this wait is ours).
                self.charged_bytes = await self.server.request_budget.acquire(
                    pending * REQUEST_MEMORY_FACTOR)
                deadline = max(deadline, trio.current_time() + self.config.frame_timeout_s)
            if self.protocol.mid_frame:
                deadline = min(deadline, trio.current_time() + self.config.frame_timeout_s)
            with trio.move_on_at(deadline):
                data = await self.stream.receive_some(RECEIVE_CHUNK_BYTES)
                if not data:
                    if self.protocol.mid_frame:
                        log.info("peer closed mid-frame")
                    return None
                self.protocol.receive_data(data)
                continue
            if not self.protocol.mid_frame and idle_check and self._in_flight():
                # Not idle while requests run: look again one idle period later.
                deadline = trio.current_time() + self.config.idle_timeout_s
                continue
            if self.protocol.mid_frame:
                detail = "frame not completed in time"
            else:
                detail = "idle timeout" if idle_check else "no hello in time"
            await self._close_with(ProtocolTimeout(detail))

    def _in_flight(self) -> bool:
        """Requests running, or subscriptions open: the connection is not idle."""
        return self.slots.value < self.config.max_in_flight or bool(self.subscriptions)

    async def _reader(self, nursery: trio.Nursery) -> None:
        frame = await self._next_frame(self.config.handshake_timeout_s, idle_check=False)
        if frame is None:
            return
        await self._handshake(frame)
        draining = self.server._draining
        while not draining.is_set():
            # Backpressure: no new request is read while max_in_flight are unanswered.
            await self.slots.acquire()
            self.slots.release()
            frame = await self._next_frame(self.config.idle_timeout_s)
            if frame is None:
                return
            budget = self.server.request_budget
            # Held until the request is answered (a frame that arrived in one piece
            # is charged now).
            charge, self.charged_bytes = self.charged_bytes, 0
            if not charge:
                charge = await budget.acquire(len(frame) * REQUEST_MEMORY_FACTOR)
            try:
                message = self.protocol.decode(frame)
            except RemoteProtocolError as exc:  # a bad message; the stream is still in sync
                budget.release(charge)
                self.server._counters.protocol_errors += 1
                await self._send(error_reply(exc.error, exc.request_id))
                continue
            del frame  # the decoded message is what the request keeps
            try:
                await self.slots.acquire()
            except BaseException:
                budget.release(charge)
                raise
            nursery.start_soon(self._request, message, charge)
            del message  # held by the request only: its memory goes when it is answered

    async def _handshake(self, frame: bytes) -> None:
        try:
            hello = self.protocol.decode_hello(frame)
        except RemoteProtocolError as exc:
            await self._close_with(exc.error, exc.request_id)
        principal = self.config.keys.authenticate(hello.api_key)
        if principal is None:
            await self._close_with(Unauthorized("invalid API key"))
        self.principal = principal
        await self._send(Welcome(version=PROTOCOL_VERSION, server=SERVER_NAME,
                                 max_frame_bytes=self.config.max_frame_bytes,
                                 max_in_flight=self.config.max_in_flight))

    async def _request(self, message: Any, charge_bytes: int = 0) -> None:
        """Answer one request. Its slot is held until the reply is queued for sending, so
        at most ``max_in_flight`` requests are running or waiting to queue a reply (and
        the queue holds at most ``max_in_flight`` more)."""
        try:
            try:
                reply = await self._answer(message)
            except MeteringError as exc:
                reply = error_reply(exc, message.id)
            except Exception:
                log.exception("request %s failed", type(message).__name__)
                reply = error_reply(MeteringError("internal error"), message.id)
            self.server._counters.requests += 1
            frame = self.protocol.send(reply)  # over max_reply_bytes: a too_large error
            try:
                await self._queue(frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        finally:
            self.server.request_budget.release(charge_bytes)
            self.slots.release()

    async def _answer(self, message: Any) -> msgspec.Struct:
        principal = self.principal
        assert principal is not None
        handler = REQUEST_HANDLERS[type(message)]
        if handler.scope is not None and handler.scope not in principal.scopes:
            raise Forbidden(f"this API key may not {handler.scope}")
        return await handler.call(self, principal, message)

    # One method per request type, named in REQUEST_HANDLERS below.

    async def _ping(self, principal: Principal, message: Ping) -> msgspec.Struct:
        return Pong(id=message.id)

    async def _ingest(self, principal: Principal, message: Ingest) -> msgspec.Struct:
        if principal.customer_id is not None:
            for index, event in enumerate(message.events):
                if event.customer_id != principal.customer_id:
                    raise Forbidden(f"event {index}: this API key may only send events of "
                                    "its own customer")
        ack = await self.server.engine.ingest(message.events, report_alerts=message.report_alerts)
        self.server._counters.events_ingested += ack.accepted
        return IngestReply(id=message.id, accepted=ack.accepted, duplicates=ack.duplicates,
                           lsn=ack.lsn, alerts=ack.alerts)

    async def _query(self, principal: Principal, message: QueryRequest) -> msgspec.Struct:
        query = restrict_query(message.query, principal.customer_id)
        return QueryReply(id=message.id, result=await self.server.engine.query(query))

    async def _define_meter(self, principal: Principal, message: DefineMeter) -> msgspec.Struct:
        return MeterReply(id=message.id, meter=await self.server.engine.define_meter(message.meter))

    async def _list_meters(self, principal: Principal, message: ListMeters) -> msgspec.Struct:
        return MetersReply(id=message.id, meters=self.server.engine.meters())

    async def _add_limit(self, principal: Principal, message: AddLimit) -> msgspec.Struct:
        return LimitReply(id=message.id, limit=await self.server.engine.add_limit(message.limit))

    async def _remove_limit(self, principal: Principal, message: RemoveLimit) -> msgspec.Struct:
        removed = await self.server.engine.remove_limit(message.limit_id)
        return RemovedReply(id=message.id, removed=removed)

    async def _cancel(self, principal: Principal, message: Cancel) -> msgspec.Struct:
        _own_customer(principal, message.customer_id)
        cancelled = await self.server.engine.cancel(
            message.meter_api_name, message.customer_id, unique_ids=message.unique_ids,
            by=principal.name)
        return CancelledReply(id=message.id, cancelled=cancelled)

    async def _cancel_where(self, principal: Principal, message: CancelWhere) -> msgspec.Struct:
        customer = message.customer_id
        if principal.customer_id is not None:
            customer = customer or principal.customer_id
            _own_customer(principal, customer)
        cancelled = await self.server.engine.cancel_where(
            message.meter_api_name, customer_id=customer, start_ms=message.start_ms,
            end_ms=message.end_ms, dimensions=message.dimensions,
            received_start_ms=message.received_start_ms,
            received_end_ms=message.received_end_ms, by=principal.name)
        return CancelledReply(id=message.id, cancelled=cancelled)

    async def _amend(self, principal: Principal, message: Amend) -> msgspec.Struct:
        _own_customer(principal, message.customer_id)
        ack = await self.server.engine.amend(message.meter_api_name, message.customer_id,
                                             message.unique_id, message.event, by=principal.name)
        return IngestReply(id=message.id, accepted=ack.accepted, duplicates=ack.duplicates,
                           lsn=ack.lsn)

    async def _list_corrections(self, principal: Principal,
                                message: ListCorrections) -> msgspec.Struct:
        customer = message.customer_id
        if principal.customer_id is not None:
            customer = customer or principal.customer_id
            _own_customer(principal, customer)
        corrections = await self.server.engine.corrections(message.meter_api_name, customer)
        if principal.customer_id is not None:
            corrections = [c for c in corrections if c.customer_id == principal.customer_id]
        return CorrectionsReply(id=message.id, corrections=corrections)

    async def _list_limits(self, principal: Principal, message: ListLimits) -> msgspec.Struct:
        limits = await self.server.engine.list_limits()
        if principal.customer_id is not None:
            limits = visible_limits(limits, principal.customer_id)
        return LimitsReply(id=message.id, limits=limits)

    # ------------------------------------------------------------- pricing

    async def _define_plan(self, principal: Principal, message: DefinePlan) -> msgspec.Struct:
        return PlanReply(id=message.id, plan=await self.server.engine.define_plan(message.plan))

    async def _get_plan(self, principal: Principal, message: GetPlan) -> msgspec.Struct:
        return PlanReply(id=message.id,
                         plan=self.server.engine.get_plan(message.plan_id, message.version))

    async def _list_plans(self, principal: Principal, message: ListPlans) -> msgspec.Struct:
        return PlansReply(id=message.id, plans=self.server.engine.plans())

    async def _assign_plan(self, principal: Principal, message: AssignPlan) -> msgspec.Struct:
        assignment = await self.server.engine.assign_plan(
            message.customer_id, message.plan_id, effective_from_ms=message.effective_from_ms)
        return AssignmentReply(id=message.id, assignment=assignment)

    async def _invoice(self, principal: Principal, message: GetInvoice) -> msgspec.Struct:
        if principal.customer_id not in (None, message.customer_id):
            raise Forbidden("this API key may only see its own customer's invoices")
        invoice = await self.server.engine.invoice(message.customer_id, message.at_ms)
        return InvoiceReply(id=message.id, invoice=invoice)

    async def _stats(self, principal: Principal, message: Stats) -> msgspec.Struct:
        return StatsReply(id=message.id, stats=self.server_statistics())

    async def _backup(self, principal: Principal, message: BackupRequest) -> msgspec.Struct:
        backup = await self.server.engine.backup(message.path)  # the store logs it
        return BackupReply(id=message.id, path=backup.path, lsn=backup.lsn,
                           size_bytes=backup.size_bytes)

    async def _subscribe(self, principal: Principal, message: Subscribe) -> msgspec.Struct:
        if message.id in self.subscriptions:
            raise InvalidRequest(f"subscription {message.id} is already open on this connection")
        if len(self.subscriptions) >= MAX_SUBSCRIPTIONS:
            raise InvalidRequest(f"at most {MAX_SUBSCRIPTIONS} subscriptions per connection")
        engine = self.server.engine
        next_seq = engine.next_alert_seq()
        scope = trio.CancelScope()
        self.subscriptions[message.id] = scope
        assert self.nursery is not None
        self.nursery.start_soon(self._push_alerts, message.id, message.from_seq, scope)
        return Subscribed(id=message.id, next_seq=next_seq)

    async def _unsubscribe(self, principal: Principal, message: Unsubscribe) -> msgspec.Struct:
        scope_of_push = self.subscriptions.pop(message.subscription, None)
        if scope_of_push is not None:
            scope_of_push.cancel()
        return Unsubscribed(id=message.id, subscription=message.subscription)

    async def _push_alerts(self, subscription_id: int, from_seq: int,
                           scope: trio.CancelScope) -> None:
        """Send a subscription's alerts as fast as the client reads them (bounded queue)."""
        customer = self.principal.customer_id if self.principal else None
        lag_noticed = False
        with scope:
            async with self.server.engine.subscribe(from_seq) as alerts:
                while True:
                    batch = await alerts.receive_batch(PUSH_BATCH)
                    if customer is not None:
                        batch = [a for a in batch if a.customer_id == customer]
                    if batch:
                        await self._send(AlertsPush(subscription=subscription_id, alerts=batch))
                    if customer is not None:
                        continue  # other customers' alert counts are not this key's business
                    behind = alerts.behind_by()
                    if behind > LAG_NOTICE and not lag_noticed:
                        lag_noticed = True
                        await self._send(Lagged(
                            subscription=subscription_id, next_seq=alerts.next_seq,
                            behind=behind))
                    elif behind <= LAG_NOTICE:
                        lag_noticed = False

    def server_statistics(self) -> dict[str, Any]:
        stats = asdict(self.server.engine.statistics())
        stats.update({f"server_{k}": v for k, v in asdict(self.server.statistics()).items()})
        stats["server_time_ms"] = time.time_ns() // 1_000_000
        return stats


def _own_customer(principal: Principal, customer_id: str) -> None:
    """A customer-bound key corrects only its own customer's events."""
    if principal.customer_id is not None and customer_id != principal.customer_id:
        raise Forbidden("this API key may only correct its own customer's events")


@dataclass(frozen=True, slots=True)
class RequestHandler:
    """How the server answers one request type: the scope a key needs (``None``: any
    key) and the ``ServerSideConnection`` method that builds the reply."""

    scope: str | None
    call: Callable[[ServerSideConnection, Principal, Any], Awaitable[msgspec.Struct]]


# Adding a request: its message in protocol/messages.py, a row here, a Client method,
# and docs/protocol.md.
REQUEST_HANDLERS: dict[type[msgspec.Struct], RequestHandler] = {
    Ping: RequestHandler(None, ServerSideConnection._ping),
    ListMeters: RequestHandler("query", ServerSideConnection._list_meters),
    QueryRequest: RequestHandler("query", ServerSideConnection._query),
    Ingest: RequestHandler("ingest", ServerSideConnection._ingest),
    DefineMeter: RequestHandler("admin", ServerSideConnection._define_meter),
    Stats: RequestHandler("admin", ServerSideConnection._stats),
    AddLimit: RequestHandler("admin", ServerSideConnection._add_limit),
    RemoveLimit: RequestHandler("admin", ServerSideConnection._remove_limit),
    ListLimits: RequestHandler("query", ServerSideConnection._list_limits),
    Subscribe: RequestHandler("query", ServerSideConnection._subscribe),
    Unsubscribe: RequestHandler(None, ServerSideConnection._unsubscribe),
    AddCustomer: RequestHandler("admin", server_customers.add_customer),
    UpdateCustomer: RequestHandler("admin", server_customers.update_customer),
    GetCustomer: RequestHandler("query", server_customers.get_customer),
    ListCustomers: RequestHandler("query", server_customers.list_customers),
    DeleteCustomer: RequestHandler("admin", server_customers.delete_customer),
    # Writes on the server's filesystem, wherever the server may: administrators only.
    BackupRequest: RequestHandler("admin", ServerSideConnection._backup),
    ReadEvents: RequestHandler("query", server_events.read_events),
    DefinePlan: RequestHandler("admin", ServerSideConnection._define_plan),
    GetPlan: RequestHandler("query", ServerSideConnection._get_plan),
    ListPlans: RequestHandler("query", ServerSideConnection._list_plans),
    AssignPlan: RequestHandler("admin", ServerSideConnection._assign_plan),
    GetInvoice: RequestHandler("query", ServerSideConnection._invoice),
    Cancel: RequestHandler("correct", ServerSideConnection._cancel),
    CancelWhere: RequestHandler("correct", ServerSideConnection._cancel_where),
    Amend: RequestHandler("correct", ServerSideConnection._amend),
    ListCorrections: RequestHandler("query", ServerSideConnection._list_corrections),
}
# The scope each request needs (kept for code that read the former table).
REQUIRED_SCOPE: dict[type[msgspec.Struct], str | None] = {
    message_type: handler.scope for message_type, handler in REQUEST_HANDLERS.items()
}
