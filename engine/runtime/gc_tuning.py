"""Tuning of the interpreter while an engine is open: the cyclic garbage collector
and the thread switch interval.

Runtime layer: the standard library only. The engine's state is mostly
GC-tracked containers that live as long as the engine, and walking them again
at every collection cost a large share of ingest time (docs/benchmarks.md).

The switch interval: the event loop commits to LMDB itself, and py-lmdb releases
the interpreter lock around every put. While another thread runs Python (a
correction's scan, block encoding), each put then waits for that thread to be
told to give the lock back, up to the switch interval (5 ms by default): 2,000
puts took about 1 ms alone and 250-380 ms beside one busy thread, about 13 ms
with 0.5 ms (docs/benchmarks.md, "Corrections after ffef2f6").
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from contextlib import contextmanager

GC_GEN0_THRESHOLD = 50_000
DEFAULT_SWITCH_INTERVAL_S = 0.0005


@contextmanager
def tuned_gc(enabled: bool) -> Iterator[None]:
    """Freeze what is alive now (the recovered state) and raise the first threshold
    from 700 to 50,000; on exit restore the threshold and unfreeze."""
    if not enabled:
        yield
        return
    previous_thresholds = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(max(previous_thresholds[0], GC_GEN0_THRESHOLD), 20, 100)
    try:
        yield
    finally:
        gc.set_threshold(*previous_thresholds)
        gc.unfreeze()


@contextmanager
def tuned_switching(interval_s: float | None) -> Iterator[None]:
    """Set the interpreter's thread switch interval (``sys.setswitchinterval``) while
    open, restoring the previous one on exit; None leaves it alone."""
    if interval_s is None:
        yield
        return
    previous = sys.getswitchinterval()
    sys.setswitchinterval(interval_s)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)
