"""Webhooks for alerts: every alert POSTed, signed, to its limit's URL and the server's.

Shell layer: trio, msgspec, the engine's public API (``Engine.subscribe``,
``Engine.get_limit``) and ``engine.http``. The engine's alert log is the queue: it
is durable and ordered by ``seq``, so the dispatcher keeps only, per URL, the
next seq it has to look at (its *cursor*), and the alerts it gave up on.

- Targets: an alert goes to its limit's ``webhook_url`` (as the limit is now)
  and to the server-wide URL, each URL once.
- Per URL, in seq order: a URL's worker delivers one alert at a time, retrying
  with exponential backoff (``backoff_initial_s`` doubling up to
  ``backoff_max_s``) for up to ``retry_for_s`` (24 h by default); then the
  alert is *parked* (``GET /webhooks/failed``, ``meter_webhooks_parked``) and
  the worker goes on. ``POST /webhooks/redeliver`` tries parked alerts again.
- At least once: a cursor moves past an alert only after it was delivered (a
  2xx answer) or parked, and the progress is saved (fsync, then an atomic
  rename) before the worker goes on; a restart resumes from the saved cursors,
  so it may deliver an alert again but never skips one. Receivers deduplicate
  by ``X-Meter-Alert-Seq``.
- URLs of limits are found by a discovery pass over the log (its own durable
  cursor): a URL seen for the first time starts at the alert that named it.
- Signature: ``X-Meter-Signature: t=<ms>,v1=<hex HMAC-SHA256(secret, "<ms>." + body)>``,
  computed for each attempt (``sign``; ``verify`` is what a receiver does).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec
import trio

from engine import Alert, Engine
from engine.errors import EngineClosed
from engine.http.app import Request, Response, Router, json_response
from engine.http.codecs import decode_json, encode_json
from engine.http.errors import HttpError
from engine.http.webhook_client import post_json

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Meter-Signature"
SEQ_HEADER = "X-Meter-Alert-Seq"
DEFAULT_RETRY_FOR_S = 24 * 3600.0
MAX_ERROR_CHARS = 300
Post = Callable[[str, bytes, list[tuple[bytes, bytes]], float], Awaitable[int]]


def sign(secret: bytes, timestamp_ms: int, body: bytes) -> str:
    """The ``X-Meter-Signature`` value for ``body`` sent at ``timestamp_ms``."""
    mac = hmac.new(secret, str(timestamp_ms).encode() + b"." + body, hashlib.sha256)
    return f"t={timestamp_ms},v1={mac.hexdigest()}"


def verify(secret: bytes, header: str, body: bytes, now_ms: int,
           tolerance_ms: int = 5 * 60_000) -> bool:
    """What a receiver checks: the HMAC matches (in constant time) and ``t`` is recent."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp_ms = int(fields["t"])
    except (KeyError, ValueError):
        return False
    expected = sign(secret, timestamp_ms, body).rsplit("v1=", 1)[1]
    return (abs(now_ms - timestamp_ms) <= tolerance_ms
            and hmac.compare_digest(expected, fields.get("v1", "")))


@dataclass(frozen=True)
class WebhookSettings:
    secret: bytes
    default_url: str | None = None  # every alert also goes here
    retry_for_s: float = DEFAULT_RETRY_FOR_S  # then the alert is parked
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 600.0
    request_timeout_s: float = 10.0
    # The durable progress (cursors and parked alerts); None keeps it in memory only.
    state_path: Path | None = None


class ParkedAlert(msgspec.Struct, rename="camel"):
    """An alert a URL did not take within the retry time."""

    url: str
    seq: int
    attempts: int
    parked_at_ms: int
    last_error: str


class Progress(msgspec.Struct):
    cursors: dict[str, int] = {}  # url -> the next seq its worker looks at
    discovered_seq: int | None = None  # the next seq the discovery pass looks at
    parked: list[ParkedAlert] = []


class FailedPage(msgspec.Struct, rename="camel"):
    failed: list[ParkedAlert]


class RedeliverIn(msgspec.Struct, rename="camel", forbid_unknown_fields=True):
    """Which parked alerts to try again: all, or those of ``url`` and/or ``seq``."""

    url: str | None = None
    seq: int | None = None


class Redelivered(msgspec.Struct, rename="camel"):
    redelivered: list[ParkedAlert]


@dataclass(frozen=True)
class WebhookStatistics:
    delivered: int
    failed_attempts: int
    parked: int
    backlog: int  # alerts not yet delivered (or parked) to some URL: the alert lag


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class WebhookDispatcher:
    """Delivers the engine's alerts. Run it with ``nursery.start(dispatcher.run)``; it
    stops when cancelled (a delivery in flight is simply tried again after a restart)."""

    def __init__(self, engine: Engine, settings: WebhookSettings, *,
                 post: Post = post_json, clock_ms: Callable[[], int] = wall_clock_ms,
                 start_seq: int | None = None) -> None:
        """``start_seq``: where a URL with no saved progress starts (default: the next
        alert when ``run`` starts); take it before the engine serves anyone, so that
        no alert raised before the dispatcher runs is left out."""
        if not settings.secret:
            raise ValueError("webhooks need a secret to sign with")
        self.engine = engine
        self.settings = settings
        self._post = post
        self._clock_ms = clock_ms
        self.progress = Progress()
        self._save_lock = trio.Lock()
        self._nursery: trio.Nursery | None = None
        self._workers: set[str] = set()
        self._scope = trio.CancelScope()
        self._start_seq = start_seq
        self.delivered = self.failed_attempts = self.save_failures = 0

    # ------------------------------------------------------------------ running

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.progress = await trio.to_thread.run_sync(self._load)
        start_seq = self.engine.next_alert_seq() if self._start_seq is None else self._start_seq
        if self.progress.discovered_seq is None:
            self.progress.discovered_seq = start_seq
        default = self.settings.default_url
        if default is not None and default not in self.progress.cursors:
            self.progress.cursors[default] = start_seq
        await self.save()
        with self._scope:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for url in list(self.progress.cursors):
                    self._start_worker(url)
                nursery.start_soon(self._discover)
                task_status.started()

    def shutdown(self) -> None:
        """Stop delivering: ``run`` returns (deliveries in flight are retried on restart)."""
        self._scope.cancel()

    def statistics(self) -> WebhookStatistics:
        cursors = self.progress.cursors.values()
        backlog = self.engine.next_alert_seq() - min(cursors) if cursors else 0
        return WebhookStatistics(self.delivered, self.failed_attempts,
                                 len(self.progress.parked), max(0, backlog))

    def targets(self, alert: Alert) -> set[str]:
        urls = set()
        if self.settings.default_url is not None:
            urls.add(self.settings.default_url)
        limit = self.engine.get_limit(alert.limit_id)
        if limit is not None and limit.webhook_url is not None:
            urls.add(limit.webhook_url)
        return urls

    def _start_worker(self, url: str) -> None:
        assert self._nursery is not None
        if url not in self._workers:
            self._workers.add(url)
            self._nursery.start_soon(self._worker, url)

    async def _discover(self) -> None:
        """Find the URLs of limits: each starts at the first alert that names it."""
        while True:
            try:
                await self._discover_from(self.progress.discovered_seq or 0)
            except EngineClosed:
                return
            except Exception:
                log.exception("webhooks: the discovery of URLs failed; starting again")
                await trio.sleep(self.settings.backoff_max_s)

    async def _discover_from(self, seq: int) -> None:
        async with self.engine.subscribe(seq) as subscription:
            async for alert in subscription:
                new = [url for url in self.targets(alert) if url not in self.progress.cursors]
                self.progress.discovered_seq = alert.seq + 1
                for url in new:
                    self.progress.cursors[url] = alert.seq
                if new:
                    await self.save()
                    for url in new:
                        self._start_worker(url)

    async def _worker(self, url: str) -> None:
        """One URL's deliveries, in seq order. An unexpected error stops this URL only, for
        a while: the worker starts again from its cursor (so it skips nothing)."""
        while True:
            try:
                async with self.engine.subscribe(self.progress.cursors[url]) as subscription:
                    async for alert in subscription:
                        if url in self.targets(alert):
                            await self._deliver(url, alert)
                            self.progress.cursors[url] = alert.seq + 1
                            await self.save()
                        else:  # nothing to send: saved with the next delivery
                            self.progress.cursors[url] = alert.seq + 1
            except EngineClosed:
                return  # the engine is closing: nothing more to deliver
            except Exception:
                log.exception("webhook %s: the worker failed; starting again", url)
                await trio.sleep(self.settings.backoff_max_s)

    async def _deliver(self, url: str, alert: Alert) -> bool:
        """Until a 2xx answer (True) or the retry time is over: then parked (False)."""
        settings = self.settings
        body = encode_json(alert)
        deadline = trio.current_time() + settings.retry_for_s
        delay = settings.backoff_initial_s
        attempts = 0
        while True:
            attempts += 1
            now_ms = self._clock_ms()
            headers = [(SIGNATURE_HEADER.lower().encode(), sign(settings.secret, now_ms,
                                                               body).encode()),
                       (SEQ_HEADER.lower().encode(), str(alert.seq).encode())]
            try:
                status = await self._post(url, body, headers, settings.request_timeout_s)
                error = None if 200 <= status < 300 else f"HTTP {status}"
            except Exception as exc:  # the receiver's failure, whatever it is; never Cancelled
                error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
            if error is None:
                self.delivered += 1
                return True
            self.failed_attempts += 1
            log.warning("webhook %s: alert %d, attempt %d failed: %s", url, alert.seq,
                        attempts, error)
            remaining = deadline - trio.current_time()
            if remaining <= 0:
                log.error("webhook %s: alert %d parked after %d attempts", url, alert.seq,
                          attempts)
                self.progress.parked.append(ParkedAlert(url, alert.seq, attempts,
                                                        self._clock_ms(), error))
                return False
            await trio.sleep(min(delay, remaining))
            delay = min(delay * 2, settings.backoff_max_s)

    # -------------------------------------------------------------- redelivery

    async def redeliver(self, url: str | None = None, seq: int | None = None
                        ) -> list[ParkedAlert]:
        """Take the matching parked alerts out of the parked list and try them again
        (each with a fresh retry time; parked again if that ends too)."""
        chosen = [p for p in self.progress.parked
                  if (url is None or p.url == url) and (seq is None or p.seq == seq)]
        if not chosen:
            return []
        self.progress.parked = [p for p in self.progress.parked if p not in chosen]
        await self.save()
        assert self._nursery is not None
        for parked in chosen:
            self._nursery.start_soon(self._redeliver_one, parked)
        return chosen

    async def _redeliver_one(self, parked: ParkedAlert) -> None:
        async with self.engine.subscribe(parked.seq) as subscription:
            alert = await subscription.__anext__()
        assert alert.seq == parked.seq  # the log is gap-free and kept
        await self._deliver(parked.url, alert)
        await self.save()

    # -------------------------------------------------------------- durability

    def _load(self) -> Progress:
        path = self.settings.state_path
        if path is None or not path.exists():
            return Progress()
        try:
            return msgspec.json.decode(path.read_bytes(), type=Progress)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            # Without it nobody knows which alerts each URL got: refuse to guess.
            raise ValueError(f"the webhook progress file {str(path)!r} is unreadable "
                             f"({exc}); restore it, or remove it to deliver only alerts "
                             "raised from now on") from None

    async def save(self) -> None:
        """Write the progress durably (no-op without a ``state_path``). A failed write
        is logged and counted, and deliveries go on: the saved cursors are then behind,
        which after a restart means alerts sent again, never skipped."""
        path = self.settings.state_path
        if path is None:
            return
        async with self._save_lock:
            raw = msgspec.json.encode(self.progress)
            try:
                await trio.to_thread.run_sync(_write_atomically, path, raw)
            except OSError as exc:
                self.save_failures += 1
                log.error("webhook progress not saved to %s: %s", path, exc)


def _write_atomically(path: Path, raw: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as file:
        file.write(raw)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


# ------------------------------------------------------------------ HTTP routes


def _dispatcher(request: Request) -> WebhookDispatcher:
    dispatcher = request.app.webhooks
    if dispatcher is None:
        raise HttpError(404, "webhooks_off", "this server delivers no webhooks (start it "
                                             "with --webhook-secret-file or "
                                             "$METER_WEBHOOK_SECRET)")
    assert isinstance(dispatcher, WebhookDispatcher)
    return dispatcher


async def list_failed(request: Request) -> Response:
    return json_response(FailedPage(list(_dispatcher(request).progress.parked)))


async def redeliver(request: Request) -> Response:
    body = await request.body()
    wanted = decode_json(body, RedeliverIn, "redelivery") if body.strip() else RedeliverIn()
    chosen = await _dispatcher(request).redeliver(wanted.url, wanted.seq)
    return json_response(Redelivered(chosen))


def add_routes(router: Router) -> None:
    router.add("GET", "/webhooks/failed", list_failed, "admin")
    router.add("POST", "/webhooks/redeliver", redeliver, "admin")
