"""The serving side's shared state: tables in the kernel registry's SQLite file, one base for each board.

Swaps (`swap_control.SwapBoard`), jobs (`jobs.JobBoard`) and rollouts (`rollout.RolloutBoard`) are
read and written by many processes at once (replicas, the controller, jobs, the CLI), so every
call opens its own connection in autocommit mode with a long busy timeout; a write that must check
and insert together takes `BEGIN IMMEDIATE` itself.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from hetforge.kernels.registry import default_path


class SqliteBoard:
    """A set of tables (`SCHEMA`, created when missing) in the registry's SQLite file, or another one."""

    SCHEMA = ""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else default_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.executescript(self.SCHEMA)

    def _db(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA busy_timeout=60000")
        return db
