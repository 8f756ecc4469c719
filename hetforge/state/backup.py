"""Online backups of the SQLite registry, and the two explicit ways back from a lost one: restore, reset.

`backup` copies the live file with SQLite's backup API (readers and writers carry on meanwhile),
checks the copy and keeps the newest `keep` in `<folder of the file>/backups`. `restore` checks a
backup and puts it in place, the current file (if any) moved aside, never deleted. `reset` is
the deliberate fresh start: the current file moved aside, an empty registry created. A PostgreSQL
database is backed up with its own tools (pg_dump, or the operator's), so these refuse a URL.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import urllib.parse
from pathlib import Path

from hetforge.state import sqlite as sqlite_backend
from hetforge.state.store import StoreCorrupt, StoreError, StoreMissing, is_url

SIDE_FILES = ("-wal", "-shm")  # SQLite's journal files beside a WAL database


class BackupError(StoreError):
    """A backup, restore or reset cannot be done; the message says why and what to do."""


def _file(location: str | Path) -> Path:
    if is_url(str(location)):
        raise BackupError(
            "the registry is in PostgreSQL: back it up with pg_dump (or your operator's scheduled backups) and restore "
            "with pg_restore; `hetforge registry backup` and `restore` copy SQLite files",
            str(location),
        )
    return Path(location)


def _stamp() -> str:
    now = time.time()
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{int(now % 1 * 1e6):06d}Z"


def _check(path: Path) -> None:
    """StoreCorrupt unless `path` is a sound SQLite database holding hetforge's tables."""
    try:
        db = sqlite3.connect("file:" + urllib.parse.quote(str(path.resolve())) + "?mode=ro", uri=True)
        try:
            problems = [r[0] for r in db.execute("PRAGMA quick_check").fetchall() if r[0] != "ok"]
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            db.close()
    except sqlite3.Error as err:
        raise StoreCorrupt(f"{path} is not a readable SQLite database ({err})", str(path), str(err)) from None
    if problems:
        raise StoreCorrupt(f"{path} is damaged ({'; '.join(problems[:3])})", str(path), "; ".join(problems))
    if "variants" not in tables:
        raise StoreCorrupt(f"{path} holds no registry (no `variants` table)", str(path))


def backup(location: str | Path, to: Path | None = None, keep: int = 24) -> Path:
    """Copy the live registry file into `to` (default: its `backups` folder); keep the newest `keep` there."""
    path = _file(location)
    if not path.exists():
        raise StoreMissing(f"nothing to back up: the registry {path} is missing", str(path))
    folder = Path(to) if to else sqlite_backend.backup_dir(path)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{path.stem}-{_stamp()}.sqlite"
    tmp = out.with_name(out.name + ".tmp")
    src = sqlite3.connect("file:" + urllib.parse.quote(str(path.resolve())) + "?mode=rw", uri=True, timeout=60)
    try:
        dst = sqlite3.connect(tmp)
        try:
            src.backup(dst)  # online: pages copied in steps, restarted when a writer changes one meanwhile
            dst.execute("PRAGMA journal_mode=DELETE")  # the copy is one self-contained file (no -wal beside it)
        finally:
            dst.close()
    except sqlite3.Error as err:
        tmp.unlink(missing_ok=True)
        raise BackupError(f"backup of {path} failed: {err}", str(path), str(err)) from None
    finally:
        src.close()
    _check(tmp)
    tmp.replace(out)
    older = sorted(folder.glob(f"{path.stem}-*.sqlite"))[:-keep] if keep > 0 else []
    for old in older:
        old.unlink(missing_ok=True)
    return out


def _move_aside(path: Path, why: str) -> Path | None:
    """Rename the file (and its journal files) to `<name>.<why>-<time>`; None when there was no file."""
    if not path.exists():
        return None
    aside = path.with_name(f"{path.name}.{why}-{_stamp()}")
    for suffix in SIDE_FILES:
        side = path.with_name(path.name + suffix)
        if side.exists():
            side.replace(aside.with_name(aside.name + suffix))
    path.replace(aside)
    return aside


def restore(location: str | Path, backup_file: Path) -> Path | None:
    """Put a checked backup in place of the registry; returns where the replaced file went (None: there was none).

    Stop the deployments that use the registry first: a process holding the old file open keeps
    writing to the file moved aside.
    """
    path = _file(location)
    backup_file = Path(backup_file)
    if not backup_file.is_file():
        raise BackupError(f"no backup file {backup_file}", str(path))
    _check(backup_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".restoring")
    tmp.unlink(missing_ok=True)
    src, dst = sqlite3.connect(backup_file), sqlite3.connect(tmp)
    try:
        src.backup(dst)
        dst.execute("PRAGMA journal_mode=WAL")
    finally:
        src.close()
        dst.close()
    aside = _move_aside(path, "replaced")
    tmp.replace(path)
    _mark(path)
    return aside


def reset(location: str | Path) -> Path | None:
    """Start fresh on purpose: the current file (if any) moved aside; the next open creates an empty registry."""
    path = _file(location)
    aside = _move_aside(path, "reset")
    sqlite_backend.marker_of(path).unlink(missing_ok=True)
    return aside


def _mark(path: Path) -> None:
    marker = sqlite_backend.marker_of(path)
    if not marker.exists():
        marker.write_text(json.dumps({"created_at": time.time(), "path": str(path), "restored": True}) + "\n")


class Schedule:
    """A thread that backs the registry up every `every_s` seconds (a failure is kept in `last_error`, retried next time)."""

    def __init__(self, location: str | Path, every_s: float, keep: int = 24, to: Path | None = None):
        self.path, self.every_s, self.keep, self.to = _file(location), every_s, keep, to
        self.last: Path | None = None
        self.last_error: str = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="registry-backup", daemon=True)

    def start(self) -> Schedule:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            try:
                self.last, self.last_error = backup(self.path, self.to, self.keep), ""
            except (StoreError, OSError) as err:
                self.last_error = str(err)
            if self._stop.wait(self.every_s):
                return
