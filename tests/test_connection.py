"""engine.protocol.connection without sockets: the handshake, frame limits, reply
limits, bad requests' ids, and the client's id matching and push routing.

``ConnectionPair`` (after h11's tests) joins a ``ClientConnection`` and a
``ServerConnection`` by handing each side's ``send`` bytes to the other's
``receive_data``, in arbitrary pieces when asked."""

from __future__ import annotations

import itertools
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import (
    BadFrame,
    BadMessage,
    ConnectionLost,
    Forbidden,
    InvalidRequest,
    ProtocolError,
    ReplyTooLarge,
    Unauthorized,
    UnsupportedVersion,
)
from engine.protocol.connection import (
    MAX_HELLO_BYTES,
    NEED_DATA,
    ClientConnection,
    ClientState,
    LocalProtocolError,
    RemoteProtocolError,
    ServerConnection,
    ServerState,
    encode_message_frame,
    error_reply,
)
from engine.protocol.framing import HEADER
from engine.protocol.messages import (
    PROTOCOL_VERSION,
    AlertsPush,
    DefineMeter,
    ErrorReply,
    Hello,
    Lagged,
    ListMeters,
    MetersReply,
    Ping,
    Pong,
    Subscribe,
    Subscribed,
    Unsubscribe,
    Unsubscribed,
    Welcome,
)
from engine.schema import Alert, Meter

HELLO = Hello(version=PROTOCOL_VERSION, client="test")


def welcome(max_frame_bytes: int = 1 << 20) -> Welcome:
    return Welcome(version=PROTOCOL_VERSION, server="test", max_frame_bytes=max_frame_bytes,
                   max_in_flight=4)


def alert(seq: int) -> Alert:
    return Alert(seq=seq, limit_id="l", customer_id="acme", meter_api_name="calls",
                 threshold=1, value=2, period_start_ms=0, crossed_at_ms=1)


class ConnectionPair:
    """A client and a server connection wired back to back, with no I/O."""

    def __init__(self, **server_options: Any) -> None:
        self.client = ClientConnection()
        self.server = ServerConnection(**server_options)

    def to_server(self, message: Any) -> Any:
        """Send from the client; the message the server reads (or ``NEED_DATA``)."""
        self.server.receive_data(self.client.send(message))
        return self.server.next_message()

    def to_client(self, message: Any) -> Any:
        """Send from the server; what the client's ``next_message`` gives."""
        self.client.receive_data(self.server.send(message))
        return self.client.next_message()

    def handshake(self) -> None:
        assert self.to_server(HELLO) == HELLO
        assert self.to_client(welcome()) == welcome()


def test_the_handshake_switches_both_sides_to_ready() -> None:
    pair = ConnectionPair()
    assert (pair.client.state, pair.server.state) == (ClientState.IDLE, ServerState.AWAIT_HELLO)
    assert pair.to_server(HELLO) == HELLO
    assert pair.server.state is ServerState.WELCOMING and pair.server.hello == HELLO
    assert pair.to_client(welcome(1234)) == welcome(1234)
    assert (pair.client.state, pair.server.state) == (ClientState.READY, ServerState.READY)
    assert pair.client.welcome == welcome(1234)
    assert pair.to_server(Ping(id=1)) == Ping(id=1)
    assert pair.to_client(Pong(id=1)) == Pong(id=1)


def test_messages_arrive_whole_from_any_split_of_the_bytes() -> None:
    pair = ConnectionPair()
    data = pair.client.send(HELLO)
    for byte in data[:-1]:
        pair.server.receive_data(bytes([byte]))
        assert pair.server.next_message() is NEED_DATA
    pair.server.receive_data(data[-1:])
    assert pair.server.next_message() == HELLO
    assert pair.server.next_message() is NEED_DATA


@pytest.mark.parametrize(("first", "error_type", "request_id"), [
    (msgspec.msgpack.encode({"type": "hello"}), ProtocolError, None),  # no version
    (msgspec.msgpack.encode({"type": "ping", "id": 7}), ProtocolError, 7),
    (msgspec.msgpack.encode({"type": "hello", "version": 99}), UnsupportedVersion, None),
    (b"\xc1", ProtocolError, None),  # not msgpack
])
def test_a_bad_first_frame_is_fatal(first: bytes, error_type: type, request_id: int | None
                                    ) -> None:
    server = ServerConnection()
    server.receive_data(HEADER.pack(len(first)) + first)
    with pytest.raises(RemoteProtocolError) as caught:
        server.next_message()
    assert type(caught.value.error) is error_type and caught.value.fatal
    assert caught.value.request_id == request_id and caught.value.code == error_type.code
    assert server.state is ServerState.CLOSED
    with pytest.raises(LocalProtocolError):
        server.next_message()


def test_frames_are_small_until_the_welcome_then_the_full_limit() -> None:
    server = ServerConnection(max_frame_bytes=1 << 20)
    server.receive_data(HEADER.pack(MAX_HELLO_BYTES + 1))
    with pytest.raises(RemoteProtocolError) as caught:
        server.next_message()
    assert type(caught.value.error) is BadFrame and caught.value.fatal

    pair = ConnectionPair(max_frame_bytes=1 << 20)
    pair.handshake()
    big = msgspec.msgpack.encode({"type": "ping", "id": 1, "pad": "x" * (2 * MAX_HELLO_BYTES)})
    pair.server.receive_data(HEADER.pack(len(big)))
    assert pair.server.next_message() is NEED_DATA
    assert pair.server.pending_frame_bytes == len(big) and pair.server.mid_frame
    pair.server.receive_data(big)
    assert pair.server.next_message() == Ping(id=1)  # unknown fields are skipped
    pair.server.receive_data(HEADER.pack((1 << 20) + 1))
    with pytest.raises(RemoteProtocolError) as caught:
        pair.server.next_message()
    assert caught.value.code == "frame_error" and pair.server.state is ServerState.CLOSED


def test_bad_requests_keep_the_connection_and_their_id_when_it_can_be_read() -> None:
    pair = ConnectionPair()
    pair.handshake()
    for payload, request_id in [
        (b"\x82\xa4type\xa4ping\xa2id", None),  # cut short
        (msgspec.msgpack.encode({"type": "define_meter", "id": 6, "meter": 3}), 6),
        (msgspec.msgpack.encode({"type": "nope", "id": 7}), 7),
        (msgspec.msgpack.encode({"type": "ping", "id": -1}), None),
        (msgspec.msgpack.encode([1, 2]), None),
    ]:
        pair.server.receive_data(HEADER.pack(len(payload)) + payload)
        with pytest.raises(RemoteProtocolError) as caught:
            pair.server.next_message()
        assert type(caught.value.error) is BadMessage and not caught.value.fatal
        if request_id is not None:
            assert caught.value.request_id == request_id
        assert pair.server.state is ServerState.READY
    assert pair.to_server(Ping(id=8)) == Ping(id=8)


def test_a_second_hello_is_a_bad_message_and_the_connection_stays() -> None:
    pair = ConnectionPair()
    pair.handshake()
    pair.server.receive_data(encode_message_frame(HELLO))
    with pytest.raises(RemoteProtocolError) as caught:
        pair.server.next_message()
    assert (caught.value.code, caught.value.request_id, caught.value.fatal) == (
        "bad_message", None, False)
    assert "already said hello" in str(caught.value)
    assert pair.to_server(Ping(id=1)) == Ping(id=1)


def test_a_reply_over_the_limit_becomes_too_large_for_the_same_request() -> None:
    pair = ConnectionPair(max_reply_bytes=500)
    pair.handshake()
    assert pair.to_server(ListMeters(id=3)) == ListMeters(id=3)
    reply = MetersReply(id=3, meters=[Meter(name=f"m{i}") for i in range(100)])
    got = pair.to_client(reply)
    assert isinstance(got, ErrorReply) and (got.code, got.id) == (ReplyTooLarge.code, 3)
    assert "500-byte limit" in got.detail
    small = MetersReply(id=4, meters=[])
    assert pair.server.send(small) == encode_message_frame(small)


def test_the_server_refuses_and_welcomes_only_in_order() -> None:
    server = ServerConnection()
    with pytest.raises(LocalProtocolError):
        server.send(welcome())
    with pytest.raises(LocalProtocolError):
        server.send(Pong(id=1))
    server.receive_data(encode_message_frame(HELLO))
    assert server.next_message() == HELLO
    refusal = server.refuse(Unauthorized("invalid API key"))
    assert msgspec.msgpack.decode(refusal[4:]) == {
        "type": "error", "code": "unauthorized", "detail": "invalid API key"}
    assert server.state is ServerState.CLOSED


def test_error_reply_carries_a_rejected_batchs_problems() -> None:
    from engine.errors import BatchRejected, EventProblem

    reply = error_reply(BatchRejected([EventProblem(2, "bad")]), 9)
    assert (reply.code, reply.id, reply.problems) == ("batch_rejected", 9, [(2, "bad")])
    assert error_reply(Forbidden("no"), 1) == ErrorReply(code="forbidden", detail="no", id=1)


# ------------------------------------------------------------------- client


def test_the_client_refuses_requests_over_the_servers_frame_limit() -> None:
    pair = ConnectionPair()
    assert pair.to_server(HELLO) == HELLO
    assert pair.to_client(welcome(max_frame_bytes=100)) == welcome(100)
    small = Subscribe(id=pair.client.next_request_id(), from_seq=2**40)
    assert len(pair.client.send(small)) < 100
    big = DefineMeter(id=pair.client.next_request_id(),
                      meter=Meter(name="m", description="d" * 200))
    with pytest.raises(InvalidRequest, match="exceeds the server's frame limit of 100"):
        pair.client.send(big)
    assert big.id not in pair.client.in_flight  # nothing was sent
    with pytest.raises(LocalProtocolError):
        pair.client.send(HELLO)  # only once


def test_replies_match_requests_in_flight_and_others_are_dropped() -> None:
    pair = ConnectionPair()
    pair.handshake()
    first, second = pair.client.next_request_id(), pair.client.next_request_id()
    assert first != second
    pair.to_server(Ping(id=first))
    pair.to_server(Ping(id=second))
    assert pair.client.in_flight == {first, second}
    pair.client.forget(first)  # its caller was cancelled
    pair.client.receive_data(pair.server.send(Pong(id=first)) + pair.server.send(Pong(id=99))
                             + pair.server.send(Pong(id=second)))
    assert pair.client.next_message() == Pong(id=second)
    assert pair.client.next_message() is NEED_DATA and pair.client.in_flight == set()
    pair.client.send(Ping(id=second))  # answered, so its id may be used again
    with pytest.raises(LocalProtocolError, match="already in flight"):
        pair.client.send(Ping(id=second))


def test_pushes_are_routed_from_the_subscribe_until_the_unsubscribe() -> None:
    pair = ConnectionPair()
    pair.handshake()
    sub = pair.client.next_request_id()
    pair.to_server(Subscribe(id=sub))
    assert pair.client.subscriptions == {sub}
    # A push may arrive before the reply to the Subscribe.
    assert pair.to_client(AlertsPush(subscription=sub, alerts=[alert(0)])).alerts == [alert(0)]
    assert pair.to_client(Subscribed(id=sub, next_seq=1)) == Subscribed(id=sub, next_seq=1)
    lagged = Lagged(subscription=sub, next_seq=1, behind=20_000)
    assert pair.to_client(lagged) == lagged
    assert pair.to_client(AlertsPush(subscription=sub + 100, alerts=[alert(1)])) is NEED_DATA
    leave = Unsubscribe(id=pair.client.next_request_id(), subscription=sub)
    pair.to_server(leave)
    assert pair.client.subscriptions == set()
    assert pair.to_client(AlertsPush(subscription=sub, alerts=[alert(2)])) is NEED_DATA
    done = Unsubscribed(id=leave.id, subscription=sub)
    assert pair.to_client(done) == done


def test_a_refused_or_abandoned_subscribe_opens_nothing() -> None:
    pair = ConnectionPair()
    pair.handshake()
    refused = pair.client.next_request_id()
    pair.to_server(Subscribe(id=refused))
    got = pair.to_client(ErrorReply(code="forbidden", detail="no", id=refused))
    assert isinstance(got, ErrorReply) and pair.client.subscriptions == set()
    abandoned = pair.client.next_request_id()
    pair.to_server(Subscribe(id=abandoned))
    pair.client.forget(abandoned)
    assert pair.client.subscriptions == set()
    answered = pair.client.next_request_id()
    pair.to_server(Subscribe(id=answered))
    pair.to_client(Subscribed(id=answered, next_seq=0))
    pair.client.forget(answered)  # after its reply: the subscription stays open
    assert pair.client.subscriptions == {answered}


def test_the_clients_fatal_errors_say_what_the_caller_sees() -> None:
    pair = ConnectionPair()
    pair.to_server(HELLO)
    with pytest.raises(RemoteProtocolError) as caught:
        pair.to_client(ErrorReply(code="unauthorized", detail="invalid API key"))
    assert type(caught.value.error) is Unauthorized and caught.value.fatal

    client = ClientConnection()
    client.send(HELLO)
    client.receive_data(encode_message_frame(Pong(id=1)))
    with pytest.raises(RemoteProtocolError, match="expected welcome, got Pong"):
        client.next_message()

    pair = ConnectionPair()
    pair.handshake()
    with pytest.raises(RemoteProtocolError) as caught:
        pair.to_client(ErrorReply(code="timeout", detail="idle timeout"))
    assert caught.value.code == "timeout" and pair.client.state is ClientState.CLOSED

    pair = ConnectionPair()
    pair.handshake()
    pair.client.receive_data(HEADER.pack(3) + b"\xc1\xc1\xc1")
    with pytest.raises(RemoteProtocolError) as caught:
        pair.client.next_message()
    assert type(caught.value.error) is ConnectionLost


@settings(max_examples=100, deadline=None)
@given(cuts=st.lists(st.integers(0, 2000), max_size=10), count=st.integers(1, 8))
def test_requests_and_replies_survive_any_split_of_the_stream(cuts: list[int], count: int
                                                              ) -> None:
    pair = ConnectionPair()
    pair.handshake()
    requests = [ListMeters(id=pair.client.next_request_id()) for _ in range(count)]
    data = b"".join(pair.client.send(request) for request in requests)
    read: list[Any] = []
    for start, end in itertools.pairwise(sorted({0, len(data), *(c % (len(data) + 1)
                                                                 for c in cuts)})):
        pair.server.receive_data(data[start:end])
        while (message := pair.server.next_message()) is not NEED_DATA:
            read.append(message)
    assert read == requests
    replies = b"".join(pair.server.send(MetersReply(id=r.id, meters=[Meter(name=f"m{r.id}")]))
                       for r in reversed(requests))  # answered in any order
    got: list[Any] = []
    for start, end in itertools.pairwise(sorted({0, len(replies), *(c % (len(replies) + 1)
                                                                    for c in cuts)})):
        pair.client.receive_data(replies[start:end])
        while (message := pair.client.next_message()) is not NEED_DATA:
            got.append(message)
    assert [reply.id for reply in got] == [r.id for r in reversed(requests)]
    assert pair.client.in_flight == set()
