"""Two checkouts side by side: the same benchmark, alternating runs, medians and ratio.

A change that claims "no regression" is judged here, in one run on one machine:
the benchmark runs in checkout A, then B, then A again ... so a burst of load from
other processes hits both about equally. Each checkout runs its own code with its
own virtual environment (``<checkout>/.venv/bin/python``, made by ``make install``
there), so A may be an older commit (``git worktree add /tmp/base <commit>``).

    python benchmarks/ab.py --a /tmp/base --b . --rounds 3 ingest -- --quick
    python benchmarks/ab.py --a /tmp/base --b . --rounds 3 tcp_ingest -- --quick

Prints each round's figures, then per figure the median of A, of B and B/A.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def _ingest_figures(report: dict[str, Any]) -> dict[str, float]:
    engine = report["summary"]["engine"]
    figures = {"floor events/s": report["summary"]["floor"]["events_per_s"]}
    for in_flight, row in engine.items():
        figures[f"in-flight {in_flight} events/s"] = row["events_per_s"]
        figures[f"in-flight {in_flight} ratio to floor"] = row["ratio_to_floor"]
        figures[f"in-flight {in_flight} ack p99 ms"] = row["ack_p99_ms"]
    return figures


def _tcp_figures(report: dict[str, Any]) -> dict[str, float]:
    figures = {"floor events/s": report["floor_events_per_s"]}
    for row in report["results"]:
        name = f"{row['connections']} conn x {row['in_flight']} in flight"
        figures[f"{name} events/s"] = row["events_per_s"]
        figures[f"{name} ratio to floor"] = row["ratio_to_floor"]
        figures[f"{name} ack p99 ms"] = row["ack_p99_ms"]
    return figures


FIGURES: dict[str, Callable[[dict[str, Any]], dict[str, float]]] = {
    "ingest": _ingest_figures,
    "tcp_ingest": _tcp_figures,
}


def run_once(checkout: Path, benchmark: str, extra: Sequence[str]) -> dict[str, float]:
    python = checkout / ".venv" / "bin" / "python"
    script = checkout / "benchmarks" / f"{benchmark}.py"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        subprocess.run([str(python), str(script), *extra, "--json", str(out)], cwd=checkout,
                       check=True, stdout=subprocess.DEVNULL, timeout=1800)
        return FIGURES[benchmark](json.loads(out.read_text()))


def git_commit(checkout: Path) -> str:
    result = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, check=False)
    dirty = subprocess.run(["git", "-C", str(checkout), "status", "--porcelain"],
                           capture_output=True, text=True, check=False).stdout.strip()
    return result.stdout.strip() + ("+changes" if dirty else "")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", type=Path, required=True, help="the baseline checkout")
    parser.add_argument("--b", type=Path, required=True, help="the changed checkout")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("benchmark", choices=sorted(FIGURES))
    parser.add_argument("extra", nargs="*", help="arguments for the benchmark (after --)")
    args = parser.parse_args(argv)
    checkouts = {"A": args.a.resolve(), "B": args.b.resolve()}
    for label, checkout in checkouts.items():
        print(f"{label}: {checkout} at {git_commit(checkout)}", flush=True)
    runs: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
    started = time.perf_counter()
    for round_index in range(args.rounds):
        # Alternate which goes first, so neither always runs on a warmer machine.
        order = ("A", "B") if round_index % 2 == 0 else ("B", "A")
        for label in order:
            figures = run_once(checkouts[label], args.benchmark, args.extra)
            runs[label].append(figures)
            print(f"round {round_index + 1} {label}: "
                  + ", ".join(f"{k} {v:,.2f}" for k, v in figures.items()), flush=True)
    print(f"\n{args.benchmark} {' '.join(args.extra)}: medians of {args.rounds} rounds "
          f"({time.perf_counter() - started:.0f} s)")
    print("| figure | A | B | B/A |")
    print("|---|---:|---:|---:|")
    summary = {}
    for name in runs["A"][0]:
        a = statistics.median(r[name] for r in runs["A"])
        b = statistics.median(r[name] for r in runs["B"])
        summary[name] = {"a": a, "b": b, "ratio": b / a if a else None}
        print(f"| {name} | {a:,.2f} | {b:,.2f} | {b / a if a else float('nan'):.3f} |")
    print(json.dumps({"benchmark": args.benchmark, "extra": args.extra,
                      "a": git_commit(checkouts["A"]), "b": git_commit(checkouts["B"]),
                      "summary": summary, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
