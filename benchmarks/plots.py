"""PNG plots of a suite report (``benchmarks/suite.py``): figures against shard count.

Benchmark support code: matplotlib with the Agg backend (no display needed).
``write_plots(report, directory)`` writes and returns the paths:

- ``throughput.png``: ingest events/s over TCP, one line per batches-in-flight
  level, with the range of the floor's runs as a band; and the same as a ratio to
  the floor run beside each shard count.
- ``latency.png``: ack p50/p99 per in-flight level, and query p50/p99 per
  query shape (log scale).
- ``recovery.png``: start → ready after SIGKILL, alert ack → alert p99, and
  server bytes per series.

Run alone, it redraws the plots of a saved report:

    python benchmarks/plots.py docs/bench/results.json docs/bench
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # after the backend is chosen

QUERY_LABELS = {
    "customer_month_by_day": "(a) one customer, month by day",
    "top100_customers_month": "(b) top 100 customers, month",
    "meter_by_dimension": "(c) meter by region, month by day",
}


def _shard_axis(ax: Any, shards: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(shards)
    ax.set_xticklabels([str(s) for s in shards])
    ax.set_xlabel("shards")
    ax.grid(True, which="both", alpha=0.3)


def _title(report: dict[str, Any]) -> str:
    m = report["machine"]
    return (f"commit {m['git_commit']}, {m['date'][:10]}, {m['cpu_count']} cores "
            f"({'quick' if report['parameters']['quick'] else 'full'} suite)")


def write_plots(report: dict[str, Any], directory: Path) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    sweep = report["sweep"]
    shards = sorted({r["shards"] for r in sweep})
    levels = sorted({r["in_flight"] for r in sweep})
    paths: dict[str, Path] = {}

    fig, (ax, ratio_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for level in levels:
        rows = sorted((r for r in sweep if r["in_flight"] == level), key=lambda r: r["shards"])
        xs = [r["shards"] for r in rows]
        line = ax.plot(xs, [r["events_per_s"] for r in rows], marker="o",
                       label=f"engine over TCP, {level} in flight")[0]
        if all("ratio_to_floor" in r for r in rows):
            ratio_ax.plot(xs, [r["ratio_to_floor"] for r in rows], marker="o",
                          color=line.get_color(), label=f"{level} in flight")
    floors = report["floor"].get("sweep_events_per_s_runs") or report["floor"]["events_per_s_runs"]
    ax.axhspan(min(floors), max(floors), color="grey", alpha=0.15,
               label="floor (decode + LMDB put + dict, in process): range of its runs")
    _shard_axis(ax, shards)
    ax.set_ylabel("events/s (median of rounds)")
    ax.set_ylim(bottom=0)
    ax.set_title("Ingest throughput", fontsize=10)
    ax.legend(fontsize=8)
    _shard_axis(ratio_ax, shards)
    ratio_ax.set_ylabel("engine / floor (floor run beside it)")
    ratio_ax.set_ylim(bottom=0)
    ratio_ax.set_title("Ingest throughput as a ratio to the floor", fontsize=10)
    ratio_ax.legend(fontsize=8)
    fig.suptitle(_title(report), fontsize=9)
    fig.tight_layout()
    paths["throughput"] = directory / "throughput.png"
    fig.savefig(paths["throughput"], dpi=110)
    plt.close(fig)

    fig, (left, right) = plt.subplots(1, 2, figsize=(13.5, 4.2))
    for level in levels:
        rows = sorted((r for r in sweep if r["in_flight"] == level), key=lambda r: r["shards"])
        xs = [r["shards"] for r in rows]
        line = left.plot(xs, [r["ack_p99_ms"] for r in rows], marker="o",
                         label=f"p99, {level} in flight")[0]
        left.plot(xs, [r["ack_p50_ms"] for r in rows], marker=".", linestyle=":",
                  color=line.get_color(), label=f"p50, {level} in flight")
    _shard_axis(left, shards)
    left.set_yscale("log")
    left.set_ylabel("ms")
    left.set_title("Ingest ack latency over TCP", fontsize=10)
    left.legend(fontsize=7)
    kept = sorted((r for r in sweep if "queries" in r), key=lambda r: r["shards"])
    for kind, label in QUERY_LABELS.items():
        xs = [r["shards"] for r in kept]
        line = right.plot(xs, [r["queries"][kind]["p99_ms"] for r in kept], marker="o",
                          label=f"p99 {label}")[0]
        right.plot(xs, [r["queries"][kind]["p50_ms"] for r in kept], marker=".",
                   linestyle=":", color=line.get_color(), label=f"p50 {label}")
        scale = report.get("recovery_at_scale") or {}
        if "error" not in scale and scale.get("queries"):
            right.plot([scale["shards"]], [scale["queries"]["results"][kind]["p99_ms"]],
                       marker="s", linestyle="", color=line.get_color(),
                       label=f"p99 at {scale['events']:,} events")
    _shard_axis(right, shards)
    right.set_yscale("log")
    right.set_ylabel("ms")
    right.set_title("Query latency over TCP", fontsize=10)
    right.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(_title(report), fontsize=9)
    fig.tight_layout()
    paths["latency"] = directory / "latency.png"
    fig.savefig(paths["latency"], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    xs = [r["shards"] for r in kept]
    axes[0].plot(xs, [r["recovery"]["ready_s"] for r in kept], marker="o",
                 label=f"{report['workload']['events']:,} events")
    at_scale = report.get("recovery_at_scale")
    if at_scale and "error" not in at_scale:
        axes[0].plot([at_scale["shards"]], [at_scale["ready_s"]], marker="s", linestyle="",
                     label=f"{at_scale['events']:,} events")
    _shard_axis(axes[0], shards)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("s (log scale)")
    axes[0].set_title("Start → ready after SIGKILL", fontsize=10)
    axes[0].legend(fontsize=8)
    alerts = sorted(report.get("alerts", []), key=lambda r: r["shards"])
    if alerts:
        axes[1].plot([r["shards"] for r in alerts],
                     [r["ack_to_alert"]["p99_ms"] for r in alerts], marker="o",
                     label="ack → alert p99")
        axes[1].plot([r["shards"] for r in alerts],
                     [r["send_to_alert"]["p99_ms"] for r in alerts], marker="o",
                     label="send → alert p99")
        axes[1].legend(fontsize=8)
    _shard_axis(axes[1], shards)
    axes[1].set_ylabel("ms")
    axes[1].set_title("Alert latency", fontsize=10)
    axes[2].plot(xs, [r["state"]["anon_bytes_per_series"] for r in kept], marker="o")
    _shard_axis(axes[2], shards)
    axes[2].set_ylabel("bytes per series (server RSS, not file-backed)")
    axes[2].set_ylim(bottom=0)
    axes[2].set_title("Memory per series", fontsize=10)
    fig.suptitle(_title(report), fontsize=9)
    fig.tight_layout()
    paths["recovery"] = directory / "recovery.png"
    fig.savefig(paths["recovery"], dpi=110)
    plt.close(fig)
    return paths


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: plots.py RESULTS_JSON OUTPUT_DIR", file=sys.stderr)
        return 2
    report = json.loads(Path(argv[0]).read_text())
    for name, path in write_plots(report, Path(argv[1])).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
