"""The HTTP shell: Amberflo-compatible and native routes around one engine.

    async with open_engine("./data") as engine, trio.open_nursery() as nursery:
        server = await nursery.start(partial(serve_http, engine, port=7434))

See docs/http.md for the routes. This package may import the engine's public
API, ``engine.auth``, ``engine.errors``, ``engine.schema``, ``engine.server``
(the TCP server's auth and bind policy, reused), msgspec, Hypercorn and
prometheus_client; never the runtime, storage or domain internals.
"""

from engine.http.serve import DEFAULT_HTTP_PORT, HttpConfig, HttpServer, serve_http

__all__ = ["DEFAULT_HTTP_PORT", "HttpConfig", "HttpServer", "serve_http"]
