"""Shared state: the SQL store under the kernel registry and the serving boards (`store.py` says how).

`open_store(location, component, migrations)` gives the process's store for a location: a
postgresql:// URL (PostgreSQL, psycopg imported when first used) or an SQLite file path. With no
location, `default_location()`: $HETFORGE_STATE_URL, else $HETFORGE_HOME/registry.sqlite.

Like `core`, this package runs on a bare GPU host: only the standard library at module level.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path

from hetforge import config
from hetforge.state.postgres import PostgresStore
from hetforge.state.sqlite import SqliteStore
from hetforge.state.store import (
    Migration,
    Result,
    Store,
    StoreCorrupt,
    StoreError,
    StoreMissing,
    StoreSchemaError,
    StoreUnavailable,
    Tx,
    is_url,
    redact,
)

__all__ = [
    "Migration",
    "Result",
    "Store",
    "StoreCorrupt",
    "StoreError",
    "StoreMissing",
    "StoreSchemaError",
    "StoreUnavailable",
    "Tx",
    "default_location",
    "forget",
    "is_url",
    "local_dir",
    "location_of",
    "open_store",
    "redact",
]


def default_location() -> str | Path:
    """$HETFORGE_STATE_URL when set, else the SQLite file $HETFORGE_HOME/registry.sqlite."""
    return config.state_url() or config.home_dir() / "registry.sqlite"


SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def location_of(location: str | Path | None) -> str | Path:
    """A location as given (a URL stays a string: `Path` would fold its `//`), or the default.

    A URL of another scheme (mysql://, a typo) is a `StoreError`, never a file of that name."""
    if not location:
        where = default_location()
        if isinstance(where, str) and not is_url(where):
            raise StoreError(
                f'Got "{redact(where)}" for HETFORGE_STATE_URL: a postgresql:// URL (unset it for the SQLite file '
                f"$HETFORGE_HOME/registry.sqlite).",
                redact(where),
            )
        return where
    text = str(location)
    if is_url(text):
        return text
    other = SCHEME.match(text)
    if other and not isinstance(location, Path):
        raise StoreError(
            f'Got "{redact(text)}" for the registry: an SQLite file path or a postgresql:// URL '
            f"({other.group(1)}:// is not a supported database).",
            redact(text),
        )
    return Path(location)


def local_dir(location: str | Path | None) -> Path:
    """A folder on this host that belongs with the state (job scratch, backups): the file's folder, else $HETFORGE_HOME."""
    where = location_of(location)
    return where.parent if isinstance(where, Path) else config.home_dir()


# One store per location per process: PostgreSQL connections are per thread and reused; migrations
# run once per component. Keyed with the pid so that a forked child opens its own connections.
_OPEN: dict[tuple[int, str], Store] = {}
_MIGRATED: set[tuple[int, str, str]] = set()
_LOCK = threading.Lock()


def open_store(location: str | Path | None, component: str = "", migrations: Sequence[Migration] = ()) -> Store:
    """The process's store for `location` (an SQLite file path or a postgresql:// URL), with the component's schema."""
    where = location_of(location)
    key = (os.getpid(), str(where))
    with _LOCK:
        store = _OPEN.get(key)
        if store is None:
            store = PostgresStore(where) if isinstance(where, str) else SqliteStore(where)
            _OPEN[key] = store
    if component and (*key, component) not in _MIGRATED:
        store.migrate(component, migrations)
        _MIGRATED.add((*key, component))
    return store


def forget(location: str | Path | None) -> None:
    """Drop the process's store for `location` (after a restore or a reset, the next open checks the file again)."""
    key = str(location_of(location))
    with _LOCK:
        store = _OPEN.pop((os.getpid(), key), None)
        for k in [k for k in _MIGRATED if k[1] == key]:
            _MIGRATED.discard(k)
    if store is not None:
        store.close()
