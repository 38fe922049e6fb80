"""Prometheus metrics of the HTTP shell and the engine behind it.

Shell layer: ``prometheus_client`` and the engine's public ``statistics()``.
Each server has its own ``CollectorRegistry`` (never the process-global one),
so several servers, or tests, in one process do not collide. Engine-wide
counters are read from ``Engine.statistics()`` at scrape time, so they count
every ingest (TCP, HTTP, embedded) and cost nothing on the hot path.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine import Engine

if TYPE_CHECKING:
    from engine.http.webhooks import WebhookDispatcher
    from engine.server import MeterServer

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                     2.5, 5.0, 10.0)

# EngineStatistics field -> (metric name, help, is a counter)
ENGINE_FIELDS: dict[str, tuple[str, str, bool]] = {
    "events_accepted": ("meter_events_accepted", "Events applied (not duplicates)", True),
    "events_duplicate": ("meter_events_duplicate",
                         "Events absorbed as duplicates of an accepted unique id", True),
    "batches": ("meter_batches", "Ingest batches acknowledged", True),
    "group_commits": ("meter_wal_group_commits", "WAL transactions committed", True),
    "snapshots": ("meter_snapshots", "Snapshots written", True),
    "alerts": ("meter_alerts", "Limit alerts raised", True),
    "series_count": ("meter_series", "Series held in memory", False),
    "bucket_count": ("meter_buckets", "One-minute buckets held in memory", False),
    "meter_count": ("meter_meters", "Meters defined", False),
    "limit_count": ("meter_limits", "Limits defined", False),
    "last_lsn": ("meter_wal_last_lsn", "Sequence number of the last WAL record", False),
    "wal_bytes_since_snapshot": ("meter_wal_bytes_since_snapshot",
                                 "WAL bytes written since the last snapshot", False),
    "recovery_ms": ("meter_recovery_milliseconds", "Duration of the last recovery", False),
    "checkpoint_ms": ("meter_checkpoint_last_milliseconds",
                      "Duration of the last checkpoint (snapshot)", False),
    "checkpoint_bytes": ("meter_checkpoint_last_bytes",
                         "Bytes the last checkpoint wrote (parts, head chunks, blocks)", False),
}


class _EngineCollector(Collector):
    def __init__(self) -> None:
        self.engine: Engine | None = None

    def collect(self) -> Iterator[Metric]:
        if self.engine is None:
            return
        stats = asdict(self.engine.statistics())
        for name, (metric, help_text, is_counter) in ENGINE_FIELDS.items():
            family: Metric
            if is_counter:
                family = CounterMetricFamily(metric, help_text, value=stats[name])
            else:
                family = GaugeMetricFamily(metric, help_text, value=stats[name])
            yield family
        yield GaugeMetricFamily("meter_writes_in_flight", "Ingest batches and other write "
                                "requests queued for the WAL or logged and not yet "
                                "acknowledged", value=self.engine.writes_in_flight())


class _TcpCollector(Collector):
    def __init__(self) -> None:
        self.server: MeterServer | None = None

    def collect(self) -> Iterator[Metric]:
        if self.server is None:
            return
        stats = self.server.statistics()
        yield GaugeMetricFamily("meter_tcp_connections", "TCP connections open now",
                                value=stats.connections)
        for name, value, help_text in (
                ("meter_tcp_connections_accepted", stats.connections_total,
                 "TCP connections accepted"),
                ("meter_tcp_connections_refused", stats.refused_connections,
                 "TCP connections refused at the connection limit"),
                ("meter_tcp_requests", stats.requests, "TCP requests answered"),
                ("meter_tcp_protocol_errors", stats.protocol_errors,
                 "TCP frames refused: bad frames, failed handshakes, timeouts")):
            yield CounterMetricFamily(name, help_text, value=value)


class _WebhookCollector(Collector):
    def __init__(self) -> None:
        self.dispatcher: WebhookDispatcher | None = None

    def collect(self) -> Iterator[Metric]:
        if self.dispatcher is None:
            return
        stats = self.dispatcher.statistics()
        yield CounterMetricFamily("meter_webhook_deliveries", "Alert webhooks delivered (2xx)",
                                  value=stats.delivered)
        yield CounterMetricFamily("meter_webhook_failed_attempts",
                                  "Alert webhook attempts that failed (retried or parked)",
                                  value=stats.failed_attempts)
        yield GaugeMetricFamily("meter_webhooks_parked", "Alerts parked after the retry time "
                                "(GET /webhooks/failed)", value=stats.parked)
        yield GaugeMetricFamily("meter_alert_lag", "Alerts raised but not yet delivered or "
                                "parked for some webhook URL", value=stats.backlog)


class HttpMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._engine = _EngineCollector()
        self.registry.register(self._engine)
        self._webhooks = _WebhookCollector()
        self.registry.register(self._webhooks)
        self._tcp = _TcpCollector()
        self.registry.register(self._tcp)
        self.requests = Counter(
            "meter_http_requests", "HTTP requests answered", ["route", "method", "status"],
            registry=self.registry)
        self.request_seconds = Histogram(
            "meter_http_request_duration_seconds", "HTTP request latency, by route", ["route"],
            buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.in_flight = Gauge(
            "meter_http_requests_in_flight", "HTTP requests being answered",
            registry=self.registry)
        self.events_rejected = Counter(
            "meter_events_rejected", "Records refused over HTTP (nothing of their request "
            "was applied), by reason", ["reason"], registry=self.registry)
        self.events_received = Counter(
            "meter_http_events_received", "Records received in accepted HTTP ingests "
            "(duplicates included)", registry=self.registry)
        self.ingest_seconds = Histogram(
            "meter_ingest_duration_seconds", "Engine ingest latency (validate, fsync, apply)",
            buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.query_seconds = Histogram(
            "meter_query_duration_seconds", "Engine query latency", buckets=LATENCY_BUCKETS_S,
            registry=self.registry)

    def attach(self, engine: Engine) -> None:
        self._engine.engine = engine

    def attach_webhooks(self, dispatcher: WebhookDispatcher) -> None:
        self._webhooks.dispatcher = dispatcher

    def attach_tcp(self, server: MeterServer) -> None:
        self._tcp.server = server

    def render(self) -> bytes:
        return generate_latest(self.registry)
