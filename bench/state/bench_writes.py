"""What a recorded write costs: writes per second into the registry's store, per backend and write kind.

PostgreSQL records every INSERT/UPDATE/DELETE and every locked transaction in `state_writes` (so that
a retry after a lost acknowledgement does not write twice, `hetforge/state/postgres.py`); upserts
are not recorded. This times, on one connection, from one thread:
- `insert`: `SwapBoard.request` (an INSERT ... RETURNING, recorded on PostgreSQL),
- `insert_unrecorded`: the same INSERT written as an upsert on its primary key (`ON CONFLICT (id) DO
  UPDATE`, which never conflicts here): one autocommit statement, what every insert cost before records,
- `upsert`: `SwapBoard.heartbeat` without signatures (never recorded),
- `queue_job`: `JobBoard.queue` (check and insert under the jobs lock, recorded),
on an SQLite file and on a throwaway PostgreSQL server (`tests/postgres.py`, fsync off, as the tests
run it: the figures compare write paths, not disks). Medians of 5 rounds of N writes each.

    python bench/state/bench_writes.py [--n 300] [--out bench/state]
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

import psycopg

from hetforge.serving.jobs import JobBoard
from hetforge.serving.swap_control import SwapBoard
from tests.postgres import PgServer, _bin_dir


def _rounds(fn, n: int, rounds: int = 5) -> list[float]:
    """Writes per second of each round."""
    out = []
    for r in range(rounds):
        start = time.perf_counter()
        for i in range(n):
            fn(r, i)
        out.append(n / (time.perf_counter() - start))
    return out


def _kinds(location) -> dict:
    swaps, jobs = SwapBoard(location), JobBoard(location)
    store = swaps.store

    def unrecorded(r, i):
        store.execute(
            "INSERT INTO swap_requests (pipeline, stage, variant, requested_by, requested_at) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (id) DO UPDATE SET variant = excluded.variant RETURNING id",
            ("bench", "s", "3", "bench", time.time()),
        )

    def queue(r, i):
        job = jobs.queue("bench", f"s{r}-{i}", "hot", "bench", [])
        jobs.finish(job.id, "done")  # frees the stage (one recorded UPDATE more: counted in the figure)

    return {
        "insert": lambda r, i: swaps.request("bench", "s", "3", requested_by="bench"),
        "insert_unrecorded": unrecorded,
        "upsert": lambda r, i: swaps.heartbeat("bench", "s", f"r{i % 4}", "reference"),
        "queue_job": queue,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()
    rows = []
    server = PgServer(_bin_dir())
    server.start()
    with psycopg.connect(server.url(), autocommit=True) as conn:
        server.version = conn.execute("SHOW server_version").fetchone()[0]
    try:
        with tempfile.TemporaryDirectory() as folder:
            for backend, location in (
                ("sqlite", Path(folder) / "registry.sqlite"),
                ("postgresql", server.new_database()),
            ):
                for kind, fn in _kinds(location).items():
                    per_s = _rounds(fn, args.n)
                    rows.append(
                        {
                            "backend": backend,
                            "kind": kind,
                            "writes_per_s_median": round(statistics.median(per_s), 1),
                            "min": round(min(per_s), 1),
                            "max": round(max(per_s), 1),
                            "n": args.n,
                        }
                    )
                    print(rows[-1], flush=True)
    finally:
        server.remove()
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "writes.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(args.out / "writes.md", "w") as f:
        f.write(
            f"# Store writes per second ({time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, psycopg {psycopg.__version__}, "
            f"PostgreSQL {server.version} (fsync off); one thread, {args.n} writes a round, median of 5 rounds)\n\n"
            "| backend | write | writes/s (median) | min | max |\n|---|---|---|---|---|\n"
        )
        for r in rows:
            f.write(f"| {r['backend']} | {r['kind']} | {r['writes_per_s_median']} | {r['min']} | {r['max']} |\n")


if __name__ == "__main__":
    main()
