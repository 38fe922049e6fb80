"""Figures the load and hostile-client tests print and bound."""

from __future__ import annotations


def percentile(values: list[float], fraction: float) -> float:
    """The value ``fraction`` of the way up the sorted values (index ``int(fraction * n)``,
    the last for 1.0)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]
