"""Tuning of the cyclic garbage collector while an engine is open.

Runtime layer: the standard library only. The engine's state is mostly
GC-tracked containers that live as long as the engine, and walking them again
at every collection cost a large share of ingest time (docs/benchmarks.md).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

GC_GEN0_THRESHOLD = 50_000


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
