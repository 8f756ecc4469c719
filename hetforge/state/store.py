"""The state-store interface: one SQL database shared by every hetforge process of a deployment.

The kernel registry and the serving boards (swaps, replica heartbeats, jobs, rollouts) write their
tables through a `Store`. Two backends implement it: an SQLite file (`sqlite.py`, the embedded
default: one host, nothing to install) and PostgreSQL (`postgres.py`, for clusters). The SQL the
callers write is the subset both understand (SQLite 3.35+ has `RETURNING` and `ON CONFLICT ... DO
UPDATE`); parameters are `?`. Schemas are versioned migrations per component, applied at open.

Every `execute` is one statement in autocommit mode. A read-check-write that must not interleave
with another process's (one job per stage, one rollout per stage) goes through `atomic(fn, lock=)`:
one transaction holding a named lock (SQLite: `BEGIN IMMEDIATE`, the single writer; PostgreSQL: a
transaction-scoped advisory lock), run again from the start when the connection was lost. On
PostgreSQL every write runs once even when its connection drops after its commit (`postgres.py`).
"""

from __future__ import annotations

import abc
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class StoreError(Exception):
    """The state store cannot do an operation; the message names the database and the cause."""

    def __init__(self, message: str, location: str = "", cause: str = ""):
        super().__init__(message)
        self.message, self.location, self.cause = message, location, cause

    def __str__(self) -> str:
        return self.message


class StoreMissing(StoreError):
    """The database file is not there (deleted at start or while serving); it is never recreated silently."""


class StoreCorrupt(StoreError):
    """The database is not a readable SQLite database (truncated, overwritten, malformed)."""


class StoreUnavailable(StoreError):
    """The database cannot be reached, locked past the timeout, or refuses writes (read-only, disk full)."""


class StoreSchemaError(StoreError):
    """The database's schema is newer than this hetforge knows."""


@dataclass(frozen=True)
class Migration:
    """One step of a component's schema: `sql` runs once, in a transaction, when `version` is not yet applied."""

    version: int
    name: str
    sql: str


class Result:
    """The rows of one statement, read in full before its connection goes back."""

    def __init__(self, rows: list, rowcount: int):
        self.rows, self.rowcount = rows, rowcount

    def fetchone(self):
        return self.rows[0] if self.rows else None

    def fetchall(self) -> list:
        return list(self.rows)

    def __iter__(self):
        return iter(self.rows)


class Tx(abc.ABC):
    """The statements of one transaction."""

    @abc.abstractmethod
    def execute(self, sql: str, args: Sequence[Any] = ()) -> Result: ...


class Store(abc.ABC):
    """One database: statements, transactions, migrations."""

    kind: str  # sqlite | postgresql
    location: str  # the file path or the URL (with no password in it)

    @abc.abstractmethod
    def execute(self, sql: str, args: Sequence[Any] = ()) -> Result:
        """One statement in autocommit mode (`?` parameters)."""

    @abc.abstractmethod
    def atomic(self, fn: Callable[[Tx], T], lock: str = "", rerun_safe: bool = False) -> T:
        """`fn(tx)` inside one transaction that holds the named lock; committed when fn returns, rolled back when it raises.

        `fn` returns a JSON value (or nothing): a backend that retries records it, so that a retry after a commit
        whose acknowledgement was lost returns it instead of running `fn` again. `rerun_safe=True` says that `fn`
        run twice ends in the same state (it checks before it writes), and skips the record.
        """

    def migrate(self, component: str, migrations: Sequence[Migration]) -> None:
        """Apply the component's migrations not yet recorded in `schema_migrations`, in version order."""
        known = max((m.version for m in migrations), default=0)

        def apply(tx: Tx) -> None:
            tx.execute(MIGRATIONS_TABLE)
            done = {
                int(r[0]) for r in tx.execute("SELECT version FROM schema_migrations WHERE component = ?", (component,))
            }
            if done and max(done) > known:
                raise StoreSchemaError(
                    f"{self.location}: the {component} schema is at version {max(done)}, this hetforge knows up to "
                    f"{known}; upgrade hetforge (a newer version wrote this database)",
                    self.location,
                )
            for m in sorted(migrations, key=lambda m: m.version):
                if m.version in done:
                    continue
                for statement in split_sql(self.dialect(m.sql)):
                    tx.execute(statement)
                tx.execute(
                    "INSERT INTO schema_migrations (component, version, name, applied_at) VALUES (?, ?, ?, ?)",
                    (component, m.version, m.name, time.time()),
                )

        self.atomic(apply, lock="hetforge-migrations", rerun_safe=True)  # applied versions are checked first

    def dialect(self, ddl: str) -> str:
        """DDL written for SQLite, in this backend's types."""
        return ddl

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections (the store is unusable afterwards)."""


MIGRATIONS_TABLE = """CREATE TABLE IF NOT EXISTS schema_migrations (
    component TEXT NOT NULL, version INTEGER NOT NULL, name TEXT NOT NULL, applied_at REAL NOT NULL,
    PRIMARY KEY (component, version)
)"""


def split_sql(script: str) -> list[str]:
    """The statements of a DDL script: `--` comments dropped, split at `;` (DDL here holds no string literals)."""
    text = re.sub(r"--[^\n]*", "", script)
    return [s.strip() for s in text.split(";") if s.strip()]


def is_url(location: str | Path) -> bool:
    return isinstance(location, str) and re.match(r"^postgres(ql)?(\+\w+)?://", location) is not None


def redact(url: str) -> str:
    """The URL with any password replaced by ***."""
    return re.sub(r"(://[^/:@]+):[^@/]*@", r"\1:***@", url)
