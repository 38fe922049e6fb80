"""What every benchmark script shares: the failure type, machine facts, percentiles.

Benchmark support code, standard library only, so that any script (and the
``meter serve`` launcher in ``benchmarks/serve.py``) can import it without
pulling in a benchmark. ``benchmarks/ingest.py`` re-exports these names for
callers that imported them from there.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import subprocess
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


class BenchmarkFailure(RuntimeError):
    """A correctness check failed or a run exceeded its time budget."""


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _git(*command: str) -> str | None:
    try:
        done = subprocess.run(["git", *command], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def machine_facts() -> dict[str, Any]:
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "trio": _package_version("trio"),
        "msgspec": _package_version("msgspec"),
        "lmdb": _package_version("lmdb"),
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": None if status is None else bool(status),
    }


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]
