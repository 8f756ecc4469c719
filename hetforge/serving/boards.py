"""The serving side's shared state: tables in the kernel registry's store, one base for each board.

Swaps (`swap_control.SwapBoard`), jobs (`jobs.JobBoard`) and rollouts (`rollout.RolloutBoard`) are
read and written by many processes at once (replicas, the controller, jobs, the CLI). They live in
the registry's store (`hetforge.state`: the SQLite file, or PostgreSQL for clusters): every
statement runs in autocommit mode, and a write that must check and insert together runs in
`store.atomic(..., lock=...)`, one transaction that no other writer of the same lock interleaves with.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hetforge import state


class Board:
    """A component's tables (its `MIGRATIONS`, applied when missing) in the registry's store, or another one."""

    COMPONENT = ""
    MIGRATIONS: Sequence[state.Migration] = ()

    def __init__(self, path: str | Path | None = None):
        self.path = state.location_of(path)  # a file path, or a postgresql:// URL
        self.store = state.open_store(self.path, self.COMPONENT, self.MIGRATIONS)
