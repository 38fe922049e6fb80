"""Smoke tests of ``benchmarks/peers.py`` that need no database server.

The SQL answer conversion is checked against the naive model of the engine
(``tests/model.py``) with SQLite (standard library) and DuckDB (when the bench
extra is installed); the whole ``run`` goes end to end on a tiny workload with
a real ``meter serve`` subprocess and SQLite, a peer whose answers are wrong is
reported FAILED, and peers whose servers are unavailable are reported SKIPPED.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import peers, services, workload
from tests.model import Model


def tiny_workload() -> workload.Workload:
    return workload.generate(11, customers=40, meters=4, events=3_000, batch_size=250,
                             duplicate_fraction=0.03, aggregations=("sum",))


def model_answers(w: workload.Workload, specs: dict[str, list[peers.QuerySpec]],
                  ) -> dict[str, list[peers.Answer]]:
    model = Model()
    for meter in w.meters:
        model.meters[meter.name] = meter
    for batch in w.batches:
        model.ingest(batch)
    answers: dict[str, list[peers.Answer]] = {}
    for kind, kind_specs in specs.items():
        answers[kind] = []
        for spec in kind_specs:
            query = spec.to_query()
            answers[kind].append([
                (label, tuple(group.get(k) for k in query.group_by), peers.exact(value))
                for label, group, value in model.query(query)])
    return answers


@pytest.mark.parametrize("peer_name", ["sqlite", "duckdb"])
def test_sql_peer_answers_equal_the_model(tmp_path: Path, peer_name: str) -> None:
    if peer_name == "duckdb":
        pytest.importorskip("duckdb")
        pytest.importorskip("numpy")
    w = tiny_workload()
    specs = peers.query_specs(w, 6, seed=3)
    reference = model_answers(w, specs)
    assert all(len(reference[kind]) == 6 for kind in peers.KINDS)
    assert sum(len(rows) for rows in reference["by_dimension"]) > 0
    assert all(len(rows) == min(peers.TOP_N, 40) for rows in reference["top_customers"])
    assert {spec.dimension for spec in specs["by_dimension"]} == {"region", "plan", "endpoint"}

    peer = peers.SqlitePeer(str(tmp_path)) if peer_name == "sqlite" else peers.DuckdbPeer(
        str(tmp_path))
    try:
        for batch in w.batches:
            peer.ingest_batch(batch)
        assert peer.accepted() == w.expected_accepted  # duplicates dropped by the key
        _, figures = peers.timed_queries(peer_name, specs, peer.answer, reference,
                                         budget_s=10.0)
    finally:
        peer.close()
    assert {kind: f["count"] for kind, f in figures.items()} == dict.fromkeys(peers.KINDS, 6)
    assert all(f["checked_equal"] for f in figures.values())


def test_a_wrong_answer_is_a_mismatch() -> None:
    spec = peers.QuerySpec("customer_month", "m", 0, peers.DAY_MS, customer="c")
    right: peers.Answer = [(0, (), 5)]
    peers.compare("x", spec, right, [(0, (), 5)])
    with pytest.raises(peers.AnswerMismatch, match="got \\(0, \\(\\), 6\\), expected"):
        peers.compare("x", spec, right, [(0, (), 6)])
    with pytest.raises(peers.AnswerMismatch, match="0 rows, expected 1"):
        peers.compare("x", spec, right, [])


class WrongSqlite(peers.SqlitePeer):
    """A peer whose top-customers answers are off by one: must be reported FAILED."""

    name = "duckdb"

    def answer(self, spec: peers.QuerySpec) -> peers.Answer:
        rows = super().answer(spec)
        if spec.kind == "top_customers" and rows:
            label, group, value = rows[-1]
            rows[-1] = (label, group, value + 1)
        return rows


def test_run_end_to_end_checks_fails_and_skips(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # No server binaries and no installing: Redis and PostgreSQL must be SKIPPED, with why.
    monkeypatch.setattr(services, "redis_binary", lambda: None)
    monkeypatch.setattr(services, "postgres_bindir", lambda: None)
    real_open = peers._open_peer

    def open_peer(name: str, tmpdir: str, servers: dict[str, Any]) -> peers.Peer:
        if name != "duckdb":
            return real_open(name, tmpdir, servers)
        (Path(tmpdir) / "wrong").mkdir()
        return WrongSqlite(str(Path(tmpdir) / "wrong"))

    monkeypatch.setattr(peers, "_open_peer", open_peer)
    out = tmp_path / "peers.json"
    args = peers.parse_args([
        "--quick", "--events", "2000", "--customers", "60", "--batch-size", "250",
        "--queries", "4", "--query-budget-s", "5", "--shards", "2", "--no-install",
        "--peers", "sqlite,duckdb,postgres_copy,postgres_rollup,redis",
        "--json", str(out), "--timeout-s", "60", "--tmpdir", str(tmp_path),
    ])
    report = peers.run(args)

    assert json.loads(out.read_text())["systems"] == json.loads(
        json.dumps(report["systems"], default=str))
    systems = report["systems"]
    assert list(systems) == ["engine", "sqlite", "duckdb", "postgres_copy",
                             "postgres_rollup", "redis"]
    engine, sqlite = systems["engine"], systems["sqlite"]
    assert engine["status"] == "ok" and sqlite["status"] == "ok"
    assert sqlite["ingest"]["accepted"] == report["parameters"]["accepted"]
    for kind in peers.KINDS:
        assert sqlite["queries"][kind]["checked_equal"] is True
        assert sqlite["queries"][kind]["count"] == engine["queries"][kind]["count"] == 4
        assert sqlite["engine_speedup"][f"{kind}_p50"] > 0
    assert systems["duckdb"]["status"] == "failed"
    assert "differs from the engine's" in systems["duckdb"]["reason"]
    assert systems["duckdb"]["queries"] is None
    for name in ("postgres_copy", "postgres_rollup", "redis"):
        assert systems[name]["status"] == "skipped"
        assert "installing disabled" in systems[name]["reason"]
    table = peers.format_table(report)
    assert "| redis | SKIPPED: redis: redis-server not installed" in table
    assert "| duckdb | FAILED: AnswerMismatch" in table
    assert list(tmp_path.iterdir()) == [out]  # the database files were removed

