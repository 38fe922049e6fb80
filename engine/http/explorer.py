"""The usage explorer: the web page at ``/``, its static files, and ``GET /api/meters``.

Shell layer: the standard library, the engine's public API (``Engine.meters``) and
``engine.http``. The page is static files (``engine/http/static``) that read every
number through the native JSON routes, so the HTTP API stays the one place where
queries are answered: no server-side templates, nothing computed here for the page.

Invariants:

- ``GET /`` is the page, whatever its query string: the page keeps its state in
  ``/?…`` and reads it in the browser. Asset paths are ``/explorer/{asset}``, one
  segment from a fixed list (``ASSETS``), so no path a client sends can name any
  other file.
- The page and its assets need no key and no engine (the page asks for a key
  when the API answers 401, and says so when the engine is still recovering).
- Everything the page loads comes from this server: the Content-Security-Policy
  allows ``'self'`` only, so a page that tried a CDN would fail in the browser.
- The chart library (uPlot, MIT) is vendored built, with its license and
  ``package.json``, under ``static/vendor/uplot``: installing the project needs
  no Node.js.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

from engine import Meter
from engine.http.app import Request, Response, Router, json_response
from engine.http.errors import HttpError

HTML = b"text/html; charset=utf-8"
# Every asset by the one name it is served under, with its file (under static/) and type.
ASSETS: dict[str, tuple[str, bytes]] = {
    "explorer.js": ("explorer.js", b"text/javascript; charset=utf-8"),
    "explorer-pricing.js": ("explorer-pricing.js", b"text/javascript; charset=utf-8"),
    "explorer.css": ("explorer.css", b"text/css; charset=utf-8"),
    "favicon.svg": ("favicon.svg", b"image/svg+xml"),
    "uPlot.iife.min.js": ("vendor/uplot/uPlot.iife.min.js", b"text/javascript; charset=utf-8"),
    "uPlot.min.css": ("vendor/uplot/uPlot.min.css", b"text/css; charset=utf-8"),
    "uPlot.LICENSE.txt": ("vendor/uplot/LICENSE", b"text/plain; charset=utf-8"),
    "uPlot.package.json": ("vendor/uplot/package.json", b"application/json"),
}
PAGE_HEADERS = [
    (b"content-security-policy",
     b"default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
     b"frame-ancestors 'none'; form-action 'self'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    # The files change only with the installed package: revalidate, never serve stale.
    (b"cache-control", b"no-cache"),
]


@cache
def static_file(relative_path: str) -> bytes:
    return resources.files("engine.http").joinpath("static", relative_path).read_bytes()


async def page(request: Request) -> Response:
    return Response(200, static_file("index.html"), HTML, list(PAGE_HEADERS))


async def asset(request: Request) -> Response:
    name = request.path_params["asset"]
    found = ASSETS.get(name)
    if found is None:
        raise HttpError(404, "not_found", f"no explorer asset {name!r}")
    relative_path, content_type = found
    return Response(200, static_file(relative_path), content_type, list(PAGE_HEADERS))


async def list_meters(request: Request) -> Response:
    """The engine's meters, by name (the explorer's meter picker)."""
    meters: list[Meter] = sorted(request.engine.meters(), key=lambda meter: meter.name)
    return json_response(meters)


def openapi_paths() -> dict[str, Any]:
    """This module's routes for ``/openapi.json`` (``engine.http.openapi`` merges them)."""
    from engine.http.openapi import _operation, _path_param, _ref

    html = {"type": "string"}
    asset_operation = _operation(
        "A static file of the explorer (script, style, the vendored chart library and "
        "its license)", html, parameters=[_path_param("asset")], secured=False)
    asset_operation["responses"]["200"]["content"] = {
        content_type.decode().split(";")[0]: {"schema": html}
        for _, content_type in ASSETS.values()}
    return {
        "/": {"get": _operation("The usage explorer (HTML); its state is in the query string",
                                html, secured=False, ok_type="text/html")},
        "/explorer/{asset}": {"get": asset_operation},
        "/api/meters": {"get": _operation("The meters, by name (the engine's Meter)",
                                          {"type": "array", "items": _ref("Meter")})},
    }


def add_routes(router: Router) -> None:
    router.add("GET", "/", page, None, needs_engine=False)
    router.add("GET", "/explorer/{asset}", asset, None, needs_engine=False)
    router.add("GET", "/api/meters", list_meters, "query")
