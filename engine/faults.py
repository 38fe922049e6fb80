"""Fault injection for crash tests: kill the process at a named point.

Shared by the runtime and storage layers: standard library only.
``METERING_ENGINE_FAULT=NAME:N`` makes the
N-th pass through ``fault_point(NAME)`` (counted from 1) kill this process with
SIGKILL, as a power cut would: no cleanup, no flushing. Unset (always, outside
tests), ``fault_point`` costs one dict lookup. The named points are listed in
``POINTS``; tests/test_history_crash.py kills at each and counts where the kills
landed (``CORRECTION_POINTS``: tests/test_crash_corrections.py).
"""

from __future__ import annotations

import os
import signal

ENV = "METERING_ENGINE_FAULT"
POINTS = (
    "seal.cut",  # a shard cut its sealed days out of the head and merged its deltas
    "checkpoint.exported",  # every shard answered; nothing written yet
    "checkpoint.in_txn",  # inside the checkpoint's write transaction, blocks put
    "checkpoint.written",  # the checkpoint's transaction committed
    "dedup.run_slice",  # inside a slice of a dedup index run being written (flush or merge)
)
# Passed by corrections only (tests/test_crash_corrections.py kills at each).
CORRECTION_POINTS = (
    "correction.scanned",  # a correction's targets found and minutes rebuilt; nothing logged
    "correction.built",  # its record and catalogue entries built in the writer; not committed
)

_passes: dict[str, int] = {}


def _target() -> tuple[str, int] | None:
    spec = os.environ.get(ENV)
    if not spec:
        return None
    name, _, count = spec.partition(":")
    return name, int(count or 1)


_TARGET = _target()


def fault_point(name: str) -> None:
    """Kill the process here if the environment says so (see the module docstring)."""
    if _TARGET is None or _TARGET[0] != name:
        return
    _passes[name] = _passes.get(name, 0) + 1
    if _passes[name] >= _TARGET[1]:
        os.kill(os.getpid(), signal.SIGKILL)
