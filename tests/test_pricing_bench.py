"""benchmarks/pricing.py runs end to end on a tiny workload, so it does not rot."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import pricing


def test_the_pricing_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "pricing.json"
    assert pricing.main(["--events", "4000", "--customers", "40", "--previews", "4",
                         "--batch-size", "500", "--batches-per-round", "2",
                         "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert set(results["ingest_events_per_s"]) == {"none", "global", "per-customer"}
    assert results["ingest_time_ratio_to_none"]["none"] == 1
    assert results["parameters"]["events"] == 4000
    assert results["invoice_preview_ms"]["median"] > 0
    assert results["alerts"] == {"none": 0, "global": 0, "per-customer": 0}
