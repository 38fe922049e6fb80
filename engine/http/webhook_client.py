"""A minimal HTTP/1.1 client for webhook deliveries: one POST per connection.

Shell layer: trio, h11 (the sans-IO HTTP/1.1 state machine Hypercorn already
uses, so no second HTTP stack is pulled in) and the standard library. It sends
one request, reads the status line and headers and at most
``MAX_RESPONSE_BYTES`` of the body, then closes: a receiver can neither hold a
delivery beyond ``timeout_s`` nor make it buffer an endless answer.
"""

from __future__ import annotations

import ssl
from urllib.parse import urlsplit

import h11
import trio

MAX_RESPONSE_BYTES = 64 * 1024
USER_AGENT = b"metering-engine-webhooks/1"


async def post_json(url: str, body: bytes, headers: list[tuple[bytes, bytes]],
                    timeout_s: float) -> int:
    """POST ``body`` to ``url``; returns the response status. Raises ``OSError``,
    ``trio.TooSlowError``, ``h11.ProtocolError`` or ``ValueError`` when no answer came."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    hostname = parts.hostname
    host_header = (f"[{hostname}]" if ":" in hostname else hostname).encode("idna")
    if parts.port:
        host_header += f":{parts.port}".encode()
    with trio.fail_after(timeout_s):
        stream: trio.abc.Stream = await trio.open_tcp_stream(parts.hostname, port)
        if parts.scheme == "https":
            stream = trio.SSLStream(stream, ssl.create_default_context(),
                                    server_hostname=parts.hostname)
        async with stream:
            connection = h11.Connection(h11.CLIENT)
            request = h11.Request(method="POST", target=target, headers=[
                (b"host", host_header),
                (b"user-agent", USER_AGENT), (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()), (b"connection", b"close"),
                *headers])
            await stream.send_all(connection.send(request) + connection.send(h11.Data(
                data=body)) + connection.send(h11.EndOfMessage()))
            received = 0
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(16384)
                    connection.receive_data(bytes(data))
                    continue
                if isinstance(event, h11.Response):
                    status = event.status_code
                    break
                if isinstance(event, h11.InformationalResponse):
                    continue
                if isinstance(event, h11.ConnectionClosed):
                    raise OSError("the receiver closed the connection without an answer")
            # Read (a bounded part of) the body, so a receiver that answers before it has
            # read the request does not see a reset; then close. The status is the
            # answer: a body cut short or a reset after it changes nothing.
            try:
                while received < MAX_RESPONSE_BYTES:
                    event = connection.next_event()
                    if event is h11.NEED_DATA:
                        data = await stream.receive_some(16384)
                        received += len(data)
                        connection.receive_data(bytes(data))
                        continue
                    if isinstance(event, h11.Data):
                        continue
                    break
            except (OSError, trio.BrokenResourceError, h11.ProtocolError):
                pass
            return status
