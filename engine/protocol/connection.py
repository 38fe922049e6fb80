"""The protocol state of one connection, sans-IO, in the manner of h11's ``Connection``.

Pure protocol layer: the standard library, msgspec, ``engine.errors`` and
``engine.protocol``. No trio, no sockets, no clocks: the shells in
``engine.server`` and ``engine.client`` own timeouts, budgets and tasks, and
move bytes between a stream and these objects with three verbs:

- ``receive_data(data)``: bytes that arrived (never the empty end-of-stream;
  the shell handles the peer closing);
- ``next_message()``: the next complete message, or ``NEED_DATA``;
- ``send(message) -> bytes``: the frame to write for ``message``.

Rules:

1. Every protocol rule lives here: hello first and only once, the version
   check, the small frame limit until the welcome, the reply-size limit, a bad
   request's id, request-id bookkeeping and push routing. The shells never
   inspect a message to decide what the protocol allows.
2. A breach by the peer raises ``RemoteProtocolError``: its ``error`` is the
   typed error it amounts to (its ``code`` is the wire code) and ``fatal`` says
   the connection is over (the state is then ``CLOSED``). A breach by us (a
   bug in the shell) raises ``LocalProtocolError``.
3. Decoding is per frame, encoding per message: nothing here runs per event.
"""

from __future__ import annotations

import enum
import itertools
from typing import Any, Final

import msgspec

from engine.errors import (
    ERRORS_BY_CODE,
    BadFrame,
    BadMessage,
    BatchRejected,
    ConnectionLost,
    EventProblem,
    InvalidRequest,
    MeteringError,
    ProtocolError,
    ReplyTooLarge,
    UnsupportedVersion,
)
from engine.protocol.framing import (
    HEADER_BYTES,
    MAX_FRAME_BYTES,
    FrameDecoder,
    FrameError,
    encode_frame,
)
from engine.protocol.messages import (
    INT64_MAX,
    PROTOCOL_VERSION,
    AlertsPush,
    ClientMessage,
    ErrorReply,
    Hello,
    Lagged,
    MessageError,
    ServerMessage,
    Subscribe,
    Unsubscribe,
    Welcome,
    decode_client_message,
    decode_server_message,
    encode_message,
)

__all__ = [
    "MAX_HELLO_BYTES",
    "MAX_REPLY_BYTES",
    "NEED_DATA",
    "ClientConnection",
    "ClientState",
    "LocalProtocolError",
    "NeedData",
    "RemoteProtocolError",
    "ServerConnection",
    "ServerState",
    "encode_message_frame",
    "error_from_reply",
    "error_reply",
    "request_id_of",
]

MAX_HELLO_BYTES = 64 * 1024  # the first frame: a version, an API key and a client name
# Replies (query results) may be larger than requests; the server caps them at 256 MiB.
MAX_REPLY_BYTES = 256 * 1024 * 1024 + 1024


class NeedData(enum.Enum):
    """``next_message`` needs more bytes before it can return a message."""

    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA


class RemoteProtocolError(Exception):
    """The peer broke the protocol.

    ``error`` is the typed error this amounts to: the server answers with its
    ``code``; the client raises it to its callers. ``request_id`` is the id of the
    request it is about, when one could be recovered. ``fatal``: the byte stream or
    the handshake is lost, so the connection must be closed after saying why.
    """

    def __init__(self, error: MeteringError, *, request_id: int | None = None,
                 fatal: bool) -> None:
        super().__init__(error.detail)
        self.error = error
        self.request_id = request_id
        self.fatal = fatal

    @property
    def code(self) -> str:
        return self.error.code


class LocalProtocolError(Exception):
    """We tried to do something the protocol does not allow (a bug in the caller)."""


def encode_message_frame(message: msgspec.Struct) -> bytes:
    """The frame (length prefix and msgpack payload) of one message."""
    return encode_frame(encode_message(message))


def error_reply(error: MeteringError, request_id: int | None = None) -> ErrorReply:
    """The error frame for ``error`` (with a rejected batch's problems)."""
    if isinstance(error, BatchRejected):
        return ErrorReply(code=error.code, detail=error.detail, id=request_id,
                          problems=[(p.index, p.reason) for p in error.problems])
    return ErrorReply(code=error.code, detail=error.detail, id=request_id)


def error_from_reply(reply: ErrorReply) -> MeteringError:
    """The typed exception for a server's error frame."""
    if reply.code == BatchRejected.code and reply.problems is not None:
        return BatchRejected([EventProblem(index, reason) for index, reason in reply.problems])
    error_type = ERRORS_BY_CODE.get(reply.code)
    if error_type is None or error_type is BatchRejected:
        # A code this client does not know (or a rejection without its problems).
        return ProtocolError(f"{reply.code}: {reply.detail}", code=reply.code)
    return error_type(reply.detail)


def request_id_of(payload: bytes) -> int | None:
    """Best effort: the ``id`` of an invalid request, so the client can match the error."""
    try:
        # Values stay raw: a bad value elsewhere in the message must not hide the id.
        fields = msgspec.msgpack.decode(payload, type=dict[str, msgspec.Raw])
        raw_id = fields.get("id")
        if raw_id is None:
            return None
        request_id = msgspec.msgpack.decode(raw_id, type=int)
    except (msgspec.DecodeError, ValueError, TypeError, RecursionError):
        return None
    return request_id if 0 <= request_id <= INT64_MAX else None


# ------------------------------------------------------------------- server


class ServerState(enum.Enum):
    AWAIT_HELLO = "await_hello"  # nothing read yet; frames are limited to MAX_HELLO_BYTES
    WELCOMING = "welcoming"  # a valid hello was read; the shell authenticates it
    READY = "ready"  # welcome sent: requests are read, replies sent
    CLOSED = "closed"  # a fatal breach: nothing more is read (replies may still be sent)


class ServerConnection:
    """The server's side of one connection.

    ``next_frame`` and ``decode`` are the two halves of ``next_message``, for a shell
    that must charge a frame to a memory budget before decoding it.
    """

    def __init__(self, *, max_frame_bytes: int = MAX_FRAME_BYTES,
                 max_reply_bytes: int = 256 * 1024 * 1024,
                 max_hello_bytes: int = MAX_HELLO_BYTES) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.max_reply_bytes = max_reply_bytes
        self.state = ServerState.AWAIT_HELLO
        self.hello: Hello | None = None
        # Until the welcome, frames are small: an unauthenticated client cannot make the
        # server buffer much.
        self._decoder = FrameDecoder(min(max_hello_bytes, max_frame_bytes))

    def receive_data(self, data: bytes | bytearray) -> None:
        self._decoder.feed(data)

    @property
    def mid_frame(self) -> bool:
        """Part of a frame has arrived (the shell's frame timeout runs)."""
        return self._decoder.mid_frame

    @property
    def pending_frame_bytes(self) -> int:
        """Payload length of a frame whose header arrived but whose body has not (else 0)."""
        return self._decoder.pending_frame_bytes

    def next_frame(self) -> bytes | NeedData:
        """The next complete frame payload, undecoded, or ``NEED_DATA``."""
        if self.state is ServerState.CLOSED:
            raise LocalProtocolError("the connection is closed for reading")
        try:
            payload = self._decoder.next_frame()
        except FrameError as exc:
            self.state = ServerState.CLOSED
            raise RemoteProtocolError(BadFrame(str(exc)), fatal=True) from None
        return NEED_DATA if payload is None else payload

    def decode(self, payload: bytes) -> ClientMessage:
        """The message in one frame: the hello first, then requests."""
        if self.state is ServerState.AWAIT_HELLO:
            return self.decode_hello(payload)
        if self.state is not ServerState.READY:
            raise LocalProtocolError(f"cannot read a request in state {self.state.name}")
        try:
            message = decode_client_message(payload)
        except MessageError as exc:
            raise RemoteProtocolError(BadMessage(str(exc)), request_id=request_id_of(payload),
                                      fatal=False) from None
        if isinstance(message, Hello):
            raise RemoteProtocolError(BadMessage("already said hello"), fatal=False)
        return message

    def decode_hello(self, payload: bytes) -> Hello:
        """The first frame, which must be a hello of our version."""
        if self.state is not ServerState.AWAIT_HELLO:
            raise LocalProtocolError(f"no hello is expected in state {self.state.name}")
        self.state = ServerState.CLOSED  # unless this is a valid hello
        try:
            message = decode_client_message(payload)
        except MessageError as exc:
            raise RemoteProtocolError(ProtocolError(f"expected hello: {exc}"),
                                      fatal=True) from None
        if not isinstance(message, Hello):
            raise RemoteProtocolError(ProtocolError("the first frame must be hello"),
                                      request_id=getattr(message, "id", None), fatal=True)
        if message.version != PROTOCOL_VERSION:
            raise RemoteProtocolError(UnsupportedVersion(
                f"client speaks version {message.version}; this server speaks {PROTOCOL_VERSION}"
            ), fatal=True)
        self.state = ServerState.WELCOMING
        self.hello = message
        return message

    def next_message(self) -> ClientMessage | NeedData:
        payload = self.next_frame()
        return payload if payload is NEED_DATA else self.decode(payload)

    def send(self, message: msgspec.Struct) -> bytes:
        """The frame for ``message``. A reply over ``max_reply_bytes`` becomes a
        ``too_large`` error for the same request; the welcome opens the full frame limit."""
        if isinstance(message, Welcome):
            if self.state is not ServerState.WELCOMING:
                raise LocalProtocolError(f"cannot welcome in state {self.state.name}")
            self.state = ServerState.READY
            self._decoder.max_frame_bytes = self.max_frame_bytes
            return encode_message_frame(message)
        request_id = getattr(message, "id", None)
        if request_id is None:  # a push, or an error about the connection
            return encode_message_frame(message)
        if self.state is ServerState.AWAIT_HELLO or self.state is ServerState.WELCOMING:
            if not isinstance(message, ErrorReply):
                raise LocalProtocolError("a reply before the welcome")
        frame = encode_message_frame(message)
        if len(frame) - HEADER_BYTES > self.max_reply_bytes:
            frame = encode_message_frame(error_reply(ReplyTooLarge(
                f"the reply would be {len(frame)} bytes, over the "
                f"{self.max_reply_bytes}-byte limit; narrow the request"), request_id))
        return frame

    def refuse(self, error: MeteringError, request_id: int | None = None) -> bytes:
        """The error frame for ``error``; the shell closes the connection after it."""
        self.state = ServerState.CLOSED
        return encode_message_frame(error_reply(error, request_id))


# ------------------------------------------------------------------- client


class ClientState(enum.Enum):
    IDLE = "idle"  # nothing sent yet
    SENT_HELLO = "sent_hello"  # waiting for the welcome
    READY = "ready"  # requests and replies
    CLOSED = "closed"  # a fatal breach by the server: nothing more is read


Reply = Any  # a ServerMessage with an ``id``


class ClientConnection:
    """The client's side of one connection: ids, matching replies, routing pushes.

    Request ids come from ``next_request_id``. A request is *in flight* from ``send``
    until its reply is returned by ``next_message`` or ``forget`` is called (its
    caller stopped waiting); replies to ids not in flight are dropped. A ``Subscribe``
    opens a subscription named by its id when it is sent (pushes may precede the
    reply); an ``Unsubscribe``, ``end_subscription`` or an error reply to the
    ``Subscribe`` ends it. Pushes for subscriptions not open are dropped.
    """

    def __init__(self, *, max_reply_bytes: int = MAX_REPLY_BYTES) -> None:
        self.state = ClientState.IDLE
        self.welcome: Welcome | None = None
        self._decoder = FrameDecoder(max_reply_bytes)
        self._ids = itertools.count(1)
        self._in_flight: set[int] = set()
        self._subscriptions: set[int] = set()

    def next_request_id(self) -> int:
        return next(self._ids)

    @property
    def in_flight(self) -> frozenset[int]:
        return frozenset(self._in_flight)

    @property
    def subscriptions(self) -> frozenset[int]:
        return frozenset(self._subscriptions)

    def receive_data(self, data: bytes | bytearray) -> None:
        self._decoder.feed(data)

    def send(self, message: ClientMessage) -> bytes:
        """The frame for ``message``; a request over the server's frame limit is refused
        with ``InvalidRequest`` before anything is sent."""
        payload = encode_message(message)
        limit = self.welcome.max_frame_bytes if self.welcome is not None else MAX_FRAME_BYTES
        if len(payload) > limit:
            raise InvalidRequest(
                f"request of {len(payload)} bytes exceeds the server's frame limit of {limit}; "
                "send smaller batches"
            )
        if isinstance(message, Hello):
            if self.state is not ClientState.IDLE:
                raise LocalProtocolError("hello is sent once, first")
            self.state = ClientState.SENT_HELLO
            return encode_frame(payload)
        request_id = message.id
        if request_id in self._in_flight:
            raise LocalProtocolError(f"request id {request_id} is already in flight")
        self._in_flight.add(request_id)
        if isinstance(message, Subscribe):
            self._subscriptions.add(request_id)
        elif isinstance(message, Unsubscribe):
            self._subscriptions.discard(message.subscription)
        return encode_frame(payload)

    def forget(self, request_id: int) -> None:
        """The caller stopped waiting: drop its reply (and its subscription, if the
        ``Subscribe`` was not answered yet)."""
        if request_id in self._in_flight:
            self._in_flight.discard(request_id)
            self._subscriptions.discard(request_id)

    def end_subscription(self, subscription_id: int) -> None:
        """Drop the subscription's pushes from now on (without telling the server)."""
        self._subscriptions.discard(subscription_id)

    def next_message(self) -> Welcome | Reply | AlertsPush | Lagged | NeedData:
        """The welcome, then replies to requests in flight and pushes of open
        subscriptions, or ``NEED_DATA``."""
        if self.state is ClientState.IDLE:
            raise LocalProtocolError("send the hello first")
        if self.state is ClientState.CLOSED:
            raise LocalProtocolError("the connection is closed for reading")
        while True:
            try:
                payload = self._decoder.next_frame()
                if payload is None:
                    return NEED_DATA
                message = decode_server_message(payload)
            except (FrameError, MessageError) as exc:
                self.state = ClientState.CLOSED
                if self.welcome is None:
                    lost = ConnectionLost(f"handshake failed: {exc!r}")
                else:
                    lost = ConnectionLost(str(exc))
                raise RemoteProtocolError(lost, fatal=True) from None
            if self.state is ClientState.SENT_HELLO:
                return self._welcome(message)
            if isinstance(message, AlertsPush | Lagged):
                if message.subscription in self._subscriptions:
                    return message
                continue
            request_id = getattr(message, "id", None)
            if request_id is None:
                self.state = ClientState.CLOSED
                if isinstance(message, ErrorReply):  # about the connection: fatal
                    raise RemoteProtocolError(error_from_reply(message), fatal=True)
                raise RemoteProtocolError(
                    ProtocolError(f"unexpected {type(message).__name__} without an id"),
                    fatal=True)
            if request_id not in self._in_flight:
                continue  # its caller was cancelled and stopped waiting
            self._in_flight.discard(request_id)
            if isinstance(message, ErrorReply):
                self._subscriptions.discard(request_id)  # a refused subscribe opened nothing
            return message

    def _welcome(self, message: ServerMessage) -> Welcome:
        if isinstance(message, Welcome):
            self.state = ClientState.READY
            self.welcome = message
            return message
        self.state = ClientState.CLOSED
        if isinstance(message, ErrorReply):
            raise RemoteProtocolError(error_from_reply(message), fatal=True)
        raise RemoteProtocolError(
            ProtocolError(f"expected welcome, got {type(message).__name__}"), fatal=True)
