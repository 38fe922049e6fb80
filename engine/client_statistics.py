"""The client's statistics records (trio's ``statistics()`` convention: frozen, documented).

Shell layer, beside ``engine.client``: the standard library only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True, slots=True)
class RemoteStatistics:
    """What ``Client.statistics()`` returns: the server's ``stats`` map, split.

    The fields are the server's, of whatever version it runs (docs/protocol.md: the map
    is for humans and dashboards, keys may be added), so they stay mappings.
    """

    engine: Mapping[str, Any]
    """The fields of the server's ``Engine.statistics()`` (``series_count``, ...)."""
    server: Mapping[str, Any]
    """The fields of its ``MeterServer.statistics()``, without the ``server_`` prefix."""
    server_time_ms: int | None
    """The server's wall clock when it answered."""

    @classmethod
    def from_stats(cls, stats: Mapping[str, Any]) -> RemoteStatistics:
        engine = {k: v for k, v in stats.items() if not k.startswith("server_")}
        server = {k.removeprefix("server_"): v for k, v in stats.items()
                  if k.startswith("server_") and k != "server_time_ms"}
        return cls(engine=MappingProxyType(engine), server=MappingProxyType(server),
                   server_time_ms=stats.get("server_time_ms"))


@dataclass(frozen=True, slots=True)
class SubscriptionStatistics:
    """What ``ClientSubscription.statistics()`` returns."""

    next_seq: int
    """The seq of the next alert this subscription will yield."""
    buffered_alerts: int
    """Alerts received and not yet read."""
    lagged: int
    """Times the reader fell ``buffer_alerts`` behind and the subscription was reopened."""
    server_lag_notices: int
    """``lagged`` notices from the server (this connection read too slowly for it)."""
