"""The dedup index's cost per group commit as the remembered ids grow: the B-tree of data
formats 3-4 beside the log-structured index of format 5, on the same LMDB store code.

For each size N (ids already remembered), both layouts are built with N random ids
(sorted bulk appends, not timed), then G group commits of B new random ids each are
timed the way the WAL writer makes them:

- ``btree``: ``LmdbStore.commit(wal, [], ids=...)``: the ids put into the one B-tree
  without overwriting, in the commit's fsynced transaction (format 3-4).
- ``lsm``: ``IdIndex.decide`` (memtable, Bloom filters, run reads on filter hits), then
  ``LmdbStore.commit(wal, [], run_slice=...)`` carrying a slice of the flush of the
  previous memtable, as ``WalWriter._commit_group`` does (format 5). The memtable is
  frozen every ``--flush-every`` groups, as checkpoints do.

Each commit also appends one WAL record of ``--record-bytes`` (the batch itself), so
the fsync is the real one. Prints per size and layout the commit time p50/p99/max and
the index's memory (Bloom filters; the B-tree's pages are file-backed).

    python benchmarks/dedup_index.py --ids 1000000,4000000 --groups 200
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.runtime.idindex import Bloom, IdIndex, Run, RunMeta, fingerprints
from engine.storage import LmdbStore
from engine.storage.base import ID_VALUE, RunSlice

BUILD_CHUNK = 200_000


def random_keys(rnd: random.Random, count: int) -> list[bytes]:
    return [b"unique_count_1\0customer-%03d\0%032x" % (rnd.randrange(100), rnd.getrandbits(128))
            for _ in range(count)]


def build_btree(store: LmdbStore, keys: list[bytes]) -> None:
    value = ID_VALUE.pack(1, 1)
    for start in range(0, len(keys), BUILD_CHUNK):
        store.commit([], [], ids=[(key, value) for key in keys[start:start + BUILD_CHUNK]])


def build_runs(store: LmdbStore, keys: list[bytes], run_count: int) -> IdIndex:
    """``run_count`` runs of the keys (as merges leave them), filters loaded."""
    index = IdIndex([], [], 0, 0, 0)
    per_run = -(-len(keys) // run_count)
    for number in range(run_count):
        part = sorted(keys[number * per_run:(number + 1) * per_run])
        bloom = Bloom.empty(len(part))
        for start in range(0, len(part), BUILD_CHUNK):
            chunk = part[start:start + BUILD_CHUNK]
            bloom.add(fingerprints(chunk))
            store.write_run(RunSlice(number, chunk))
        index.runs.append(Run(number, RunMeta(len(part), number, number), bloom))
    index.next_run = run_count
    return index


def figures(times_s: list[float]) -> dict[str, float]:
    ordered = sorted(times_s)
    return {"p50_ms": statistics.median(ordered) * 1000,
            "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
            "max_ms": ordered[-1] * 1000}


def run_btree(path: Path, base: list[bytes], args: argparse.Namespace,
              rnd: random.Random) -> dict[str, float]:
    store = LmdbStore(path)
    try:
        build_btree(store, base)
        record = b"x" * args.record_bytes
        times = []
        for group in range(args.groups):
            value = ID_VALUE.pack(group + 2, 1)
            ids = [(key, value) for key in random_keys(rnd, args.batch)]
            started = time.perf_counter()
            duplicates = store.commit([(store.last_lsn() + 1, record)], [], ids=ids)
            times.append(time.perf_counter() - started)
            if True in duplicates:  # 128 random bits per id: a duplicate is a bug
                raise AssertionError("the B-tree called a new id a duplicate")
        return {**figures(times), "filter_bytes": 0}
    finally:
        store.close()


def run_lsm(path: Path, base: list[bytes], args: argparse.Namespace,
            rnd: random.Random) -> dict[str, float]:
    store = LmdbStore(path)
    try:
        index = build_runs(store, base, args.runs)
        record = b"x" * args.record_bytes
        times = []
        for group in range(args.groups):
            keys = random_keys(rnd, args.batch)
            lsn = store.last_lsn() + 1
            started = time.perf_counter()
            flags, new = index.decide(store, keys, [1] * len(keys))
            work = index.prepare(store, len(keys)) if index.pending() else None
            store.commit([(lsn, record)], [], run_slice=work)
            index.committed()
            index.accept(new)
            times.append(time.perf_counter() - started)
            if True in flags:
                raise AssertionError("the index called a new id a duplicate")
            if (group + 1) % args.flush_every == 0:
                index.freeze(lsn)
        again = base[:: max(1, len(base) // 1000)]  # and it still knows the old ones
        if False in index.decide(store, again, [1] * len(again))[0]:
            raise AssertionError("the index forgot a remembered id")
        return {**figures(times), "filter_bytes": index.filter_bytes(),
                "runs": len(index.runs)}
    finally:
        store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ids", default="1000000,4000000",
                        help="remembered ids before the timed groups, comma separated")
    parser.add_argument("--groups", type=int, default=200)
    parser.add_argument("--batch", type=int, default=4000, help="new ids per group commit")
    parser.add_argument("--runs", type=int, default=12, help="runs the LSM's ids are in")
    parser.add_argument("--flush-every", type=int, default=50)
    parser.add_argument("--record-bytes", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--tmpdir", default=None)
    args = parser.parse_args(argv)
    print("| remembered ids | layout | commit p50 ms | p99 ms | max ms | filter MiB |")
    print("|---:|---|---:|---:|---:|---:|")
    for size in [int(part) for part in args.ids.split(",")]:
        base = random_keys(random.Random(args.seed), size)
        for layout, function in (("btree (format 3-4)", run_btree), ("lsm (format 5)", run_lsm)):
            directory = Path(tempfile.mkdtemp(prefix="dedup-bench-", dir=args.tmpdir))
            try:
                result = function(directory, base, args, random.Random(args.seed + 1))
            finally:
                shutil.rmtree(directory, ignore_errors=True)
            print(f"| {size:,} | {layout} | {result['p50_ms']:.1f} | {result['p99_ms']:.1f} | "
                  f"{result['max_ms']:.1f} | {result['filter_bytes'] / 2**20:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
