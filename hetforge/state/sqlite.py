"""The SQLite backend: one file on one host, WAL journal, every call on its own connection.

The file is created once, on first use, beside a marker (`registry.sqlite.created`). From then on a
missing file is an error, never silently recreated: at start (the marker is there, the file is not)
and while serving (connections open the file with `mode=rw`, which does not create it). The first
open in a process checks the file (`PRAGMA quick_check`), so a truncated or overwritten file is one
error naming the path and the fix, not a failure deep in a replica. WAL does not work across hosts
on a network filesystem; clusters use PostgreSQL.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from hetforge.state.store import Result, Store, StoreCorrupt, StoreError, StoreMissing, StoreUnavailable, Tx

T = TypeVar("T")


def marker_of(path: Path) -> Path:
    """The file that records that `path` was created (so that its absence later is an error)."""
    return path.with_name(path.name + ".created")


def backup_dir(path: Path) -> Path:
    """Where `hetforge registry backup` writes a file's backups by default."""
    return path.parent / "backups"


def newest_backup(path: Path) -> Path | None:
    found = sorted(backup_dir(path).glob(f"{path.stem}-*.sqlite"))
    return found[-1] if found else None


def fix_hint(path: Path) -> str:
    """What a user can do about a missing or broken file: restore a backup, or start fresh explicitly."""
    newest = newest_backup(path)
    restore = f"hetforge registry restore {newest}" if newest else "hetforge registry restore BACKUP_FILE"
    return (
        f"restore a backup (`{restore} --registry {path}`), or start fresh, losing its variants, jobs and "
        f"rollouts (`hetforge registry reset --registry {path}`)"
    )


class _SqliteTx(Tx):
    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Result:
        cur = self.db.execute(sql, tuple(args))
        rows = cur.fetchall()
        return Result(rows, cur.rowcount)


class SqliteStore(Store):
    """A store in one SQLite file."""

    kind = "sqlite"

    def __init__(self, path: Path, timeout_s: float = 60.0):
        self.path, self.timeout_s = Path(path), timeout_s
        self.location = str(self.path)
        marker = marker_of(self.path)
        if not self.path.exists():
            if marker.exists():
                raise StoreMissing(self._missing_message(), self.location)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")  # persistent: readers never wait for the writer
            db.close()
        elif self.path.stat().st_size == 0 and marker.exists():
            raise StoreCorrupt(f"the registry {self.path} is empty (truncated); {fix_hint(self.path)}", self.location)
        else:
            self.check()
        if not marker.exists():
            tmp = marker.with_name(f"{marker.name}.{os.getpid()}.tmp")  # per process: two first opens may race
            tmp.write_text(json.dumps({"created_at": time.time(), "path": str(self.path)}) + "\n")
            tmp.replace(marker)

    def _missing_message(self) -> str:
        try:
            since = time.strftime(
                "%Y-%m-%d %H:%M UTC", time.gmtime(json.loads(marker_of(self.path).read_text())["created_at"])
            )
        except (OSError, ValueError, KeyError):
            since = "earlier"
        return (
            f"the registry {self.path} is missing: it was created {since} (marker {marker_of(self.path)}) and is gone, "
            f"deleted or its volume not mounted; it is not recreated empty. To fix: {fix_hint(self.path)}"
        )

    def check(self) -> None:
        """StoreCorrupt unless the file reads as a sound SQLite database."""
        try:
            db = self._connect()
            try:
                rows = db.execute("PRAGMA quick_check").fetchall()
                db.execute("PRAGMA journal_mode=WAL")
            finally:
                db.close()
        except sqlite3.Error as err:
            raise self._error(err) from None
        problems = [r[0] for r in rows if r[0] != "ok"]
        if problems:
            raise StoreCorrupt(
                f"the registry {self.path} is damaged ({'; '.join(problems[:3])}); {fix_hint(self.path)}",
                self.location,
                "; ".join(problems),
            )

    def _connect(self) -> sqlite3.Connection:
        # mode=rw: a file deleted meanwhile is an error here, not a new empty database
        uri = "file:" + urllib.parse.quote(str(self.path.resolve())) + "?mode=rw"
        db = sqlite3.connect(uri, uri=True, timeout=self.timeout_s, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute(f"PRAGMA busy_timeout={int(self.timeout_s * 1000)}")
        return db

    def _error(self, err: sqlite3.Error) -> StoreError:
        text = str(err)
        if not self.path.exists():
            return StoreMissing(self._missing_message(), self.location, text)
        if type(err) is sqlite3.DatabaseError or "malformed" in text or "not a database" in text:
            return StoreCorrupt(
                f"the registry {self.path} is not a readable SQLite database ({text}); {fix_hint(self.path)}",
                self.location,
                text,
            )
        return StoreUnavailable(f"the registry {self.path} refused the operation: {text}", self.location, text)

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Result:
        return self._run(lambda tx: tx.execute(sql, args), begin=False)

    def atomic(self, fn: Callable[[Tx], T], lock: str = "", rerun_safe: bool = False) -> T:
        """`fn(tx)` in one `BEGIN IMMEDIATE` transaction: SQLite has one writer, which is the lock whatever its name.

        Nothing is retried here (a local file has no connection to lose), so `rerun_safe` changes nothing."""
        return self._run(fn, begin=True)

    def _run(self, fn: Callable[[Tx], T], begin: bool) -> T:
        try:
            db = self._connect()
        except sqlite3.Error as err:
            raise self._error(err) from None
        try:
            if not begin:
                return fn(_SqliteTx(db))
            db.execute("BEGIN IMMEDIATE")
            try:
                out = fn(_SqliteTx(db))
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return out
        except (sqlite3.OperationalError, sqlite3.DatabaseError) as err:
            if isinstance(err, (sqlite3.IntegrityError, sqlite3.ProgrammingError)):
                raise
            raise self._error(err) from None
        finally:
            db.close()

    def close(self) -> None:
        """Nothing to release: every call opens and closes its own connection."""
