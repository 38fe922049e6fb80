"""Helpers for the HTTP tests: a server on 127.0.0.1 port 0 and a blocking client in a thread."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import requests
import trio

from engine import Engine
from engine.http import HttpConfig, HttpServer

NOW = 1_790_000_000_000  # the engine clock of tests/conftest.py


@asynccontextmanager
async def open_http(engine: Engine | None, timeout_s: float = 30,
                    **config: Any) -> AsyncIterator[HttpServer]:
    """An ``HttpServer`` on 127.0.0.1, port 0; ``server.port`` is the bound port. The
    whole use of it is bounded by ``timeout_s``."""
    config.setdefault("drain_timeout_s", 2.0)
    config.setdefault("clock_ms", lambda: NOW)
    server = HttpServer(engine, HttpConfig(host="127.0.0.1", port=0, **config))
    with trio.fail_after(timeout_s):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            try:
                yield server
            finally:
                server.shutdown()


def url(server: HttpServer, path: str) -> str:
    return f"http://127.0.0.1:{server.port}{path}"


async def http(method: str, address: str, **kwargs: Any) -> requests.Response:
    """``requests.request`` in a worker thread, with a timeout, never following redirects."""
    kwargs.setdefault("timeout", 10)
    kwargs.setdefault("allow_redirects", False)
    call = functools.partial(requests.request, method, address, **kwargs)
    return await trio.to_thread.run_sync(call)


async def raw_exchange(port: int, request: bytes, read_bytes: int = 65536) -> bytes:
    """Send raw bytes, return what the server answers before it closes (or 64 KiB)."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(request)
            received = b""
            while len(received) < read_bytes:
                chunk = await stream.receive_some(read_bytes)
                if not chunk:
                    break
                received += chunk
                if b"\r\n\r\n" in received:
                    head, _, body = received.partition(b"\r\n\r\n")
                    length = [line for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:")]
                    if length and len(body) >= int(length[0].split(b":")[1]):
                        break
            return received
