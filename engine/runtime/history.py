"""How much history the engine keeps where: the hot window and the raw-event retention.

Runtime layer: standard library and the domain's block constants. The writer asks
this policy, at each checkpoint, which days leave the head (``seal_before_minute``)
and how far the write-ahead log may be trimmed (``wal_marks_after``). Time is the
engine's clock (``clock_ms``), read by the writer only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from engine.domain.blocks import DAY_MINUTES, DAY_MS

DEFAULT_HOT_WINDOW_MS = 2 * DAY_MS
DEFAULT_RAW_RETENTION_MS = 60 * DAY_MS
# Checkpoint marks closer together than this are merged (the later one kept): bounds the
# marks to one per hour of the retention, delaying a trim by at most this much.
MARK_SPACING_MS = 3_600_000


@dataclass(frozen=True, slots=True)
class HistoryPolicy:
    """``hot_window_ms``: the head holds the UTC days starting at most this long ago
    (None: never seal, everything stays in memory). ``raw_retention_ms``: accepted
    events stay in the write-ahead log at least this long after the checkpoint that
    follows them (0: forever)."""

    clock_ms: Callable[[], int]
    hot_window_ms: int | None = DEFAULT_HOT_WINDOW_MS
    raw_retention_ms: int = DEFAULT_RAW_RETENTION_MS

    def __post_init__(self) -> None:
        hot = self.hot_window_ms
        if hot is not None and (type(hot) is not int or hot < DAY_MS):
            raise ValueError(f"hot_window_ms must be None or at least one day ({DAY_MS} ms), "
                             f"got {hot!r}: the head always holds the current day")
        retention = self.raw_retention_ms
        if type(retention) is not int or retention < 0:
            raise ValueError(f"raw_retention_ms must be a non-negative integer (0: forever), "
                             f"got {retention!r}")

    def seal_before_minute(self, now_ms: int) -> int:
        """The first minute of the oldest UTC day the head keeps at ``now_ms``."""
        if self.hot_window_ms is None:
            return 0
        oldest_day = -((self.hot_window_ms - now_ms) // DAY_MS)  # ceil((now - hot) / day)
        return max(0, oldest_day) * DAY_MINUTES

    def wal_marks_after(self, marks: list[list[int]], lsn: int,
                        now_ms: int) -> tuple[list[list[int]], int]:
        """The checkpoint marks to keep after a checkpoint at ``lsn``, and the lsn the WAL
        may be trimmed through (0: none)."""
        if not self.raw_retention_ms:
            return [], 0
        kept = [list(mark) for mark in marks]
        if kept and now_ms - kept[-1][1] < MARK_SPACING_MS:
            kept[-1] = [lsn, now_ms]
        else:
            kept.append([lsn, now_ms])
        cutoff = now_ms - self.raw_retention_ms
        trim_through = max((mark_lsn for mark_lsn, at_ms in kept if at_ms <= cutoff), default=0)
        return [mark for mark in kept if mark[0] > trim_through], trim_through
