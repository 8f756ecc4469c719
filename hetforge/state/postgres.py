"""The PostgreSQL backend (psycopg 3): the state of a deployment that spans hosts.

The URL comes from configuration or $HETFORGE_STATE_URL; the password never sits in it or in a
pipeline file: libpq reads PGPASSWORD or PGPASSFILE (in Kubernetes, from a Secret). psycopg is
imported when the first connection opens, so hosts that use SQLite need not install it.

Each thread keeps one autocommit connection. When the server goes away (restart, failover,
network), a call reconnects with exponential backoff (0.1 s doubling to 2 s) for up to
$HETFORGE_STATE_RETRY_S, then fails with `StoreUnavailable` naming the cause. Only a call whose
connection was lost is run again.

A write can commit and then lose its connection before the acknowledgement arrives; run again, it
would insert a second row (or find its own row and answer "already there"). So every write is run
once: an INSERT, UPDATE or DELETE through `execute`, and every `atomic` transaction, commits in one
transaction with a row of `state_writes` keyed by a random id and holding the call's result. A retry
first looks its key up: found, the commit landed and the recorded result is returned; not found,
the transaction rolled back with the connection and runs again. Upserts (`ON CONFLICT ... DO
UPDATE`) and `atomic(..., rerun_safe=True)` (migrations) skip the record: running them twice ends
in the same state. Keys older than `KEEP_KEYS_S` (far beyond any retry window) are deleted.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from hetforge import config
from hetforge.state.store import Migration, Result, Store, StoreUnavailable, Tx, redact

T = TypeVar("T")
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.1, 2.0
KEEP_KEYS_S = 24 * 3600  # a retry lasts at most $HETFORGE_STATE_RETRY_S (at most a day)
PRUNE_EVERY = 256  # recorded writes between two deletions of old keys, per store
WRITE = re.compile(r"^\s*(INSERT|UPDATE|DELETE)\b", re.IGNORECASE)
UPSERT = re.compile(r"\bON\s+CONFLICT\b[^;]*\bDO\s+UPDATE\b", re.IGNORECASE)
# the store's own table: the outcome of each recorded write, for retries that lost the acknowledgement
STATE_MIGRATIONS = (
    Migration(
        1,
        "state_writes",
        "CREATE TABLE IF NOT EXISTS state_writes (key TEXT PRIMARY KEY, result TEXT NOT NULL, at REAL NOT NULL);"
        "CREATE INDEX IF NOT EXISTS state_writes_at ON state_writes (at)",
    ),
)


class Row:
    """A row read by name (`row["id"]`), by position (`row[0]`), iterated as values, `dict(row)`: as sqlite3.Row."""

    __slots__ = ("_values", "_index")

    def __init__(self, values: tuple, index: dict[str, int]):
        self._values, self._index = values, index

    def __getitem__(self, key):
        return self._values[self._index[key]] if isinstance(key, str) else self._values[key]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def keys(self) -> list[str]:
        return list(self._index)


def _row_factory(cursor):
    index = {c.name: i for i, c in enumerate(cursor.description or ())}
    return lambda values: Row(tuple(values), index)


def _psycopg():
    """The psycopg module, or StoreUnavailable saying how to install it (only PostgreSQL deployments need it)."""
    try:
        import psycopg
    except ImportError:
        raise StoreUnavailable(
            "a postgresql:// state location needs psycopg 3: pip install 'hetforge[postgres]'"
        ) from None
    return psycopg


def to_pg(sql: str) -> str:
    """`?` parameters as psycopg's `%s` (a literal `%` doubled)."""
    return sql.replace("%", "%%").replace("?", "%s")


def _encode(out: Any) -> str:
    """A call's result as JSON, to be returned again by a retry: a `Result` (its rows by name) or a JSON value."""
    if isinstance(out, Result):
        columns = out.rows[0].keys() if out.rows and isinstance(out.rows[0], Row) else []
        return json.dumps(
            {"result": {"columns": columns, "rows": [list(r) for r in out.rows], "rowcount": out.rowcount}}
        )
    try:
        return json.dumps({"value": out})
    except TypeError:
        raise TypeError(
            f"a recorded write must return a Result or a JSON value (ints, strings, lists, dicts), not {type(out).__name__}"
        ) from None


def _decode(text: str) -> Any:
    doc = json.loads(text)
    if "value" in doc:
        return doc["value"]
    index = {c: i for i, c in enumerate(doc["result"]["columns"])}
    return Result([Row(tuple(r), index) for r in doc["result"]["rows"]], doc["result"]["rowcount"])


class _PgTx(Tx):
    def __init__(self, conn):
        self.conn = conn

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Result:
        cur = self.conn.execute(to_pg(sql), tuple(args) if args else None)
        rows = cur.fetchall() if cur.description else []
        return Result(rows, cur.rowcount)


class PostgresStore(Store):
    """A store in a PostgreSQL database."""

    kind = "postgresql"

    def __init__(self, url: str, retry_s: float | None = None, connect_timeout_s: int = 10):
        # SQLAlchemy-style URLs name a driver (postgresql+psycopg://); libpq knows postgresql:// and postgres://
        url = re.sub(r"^postgres(ql)?\+\w+://", "postgresql://", url)
        self.url, self.location = url, redact(url)
        self.retry_s = config.state_retry_s() if retry_s is None else retry_s
        self.connect_timeout_s = connect_timeout_s
        self._local = threading.local()
        self._all: list = []  # every thread's connection, to close them all
        self._all_lock = threading.Lock()
        self.retries = 0  # calls tried again after the connection was lost or could not be opened
        self.replayed = 0  # retried writes whose commit had landed: their recorded result was returned
        self._recorded = 0  # writes recorded in state_writes by this store
        # when the database answered again after a lost connection (wall time; 0: never lost); silences that
        # span an outage (a job's heartbeat) count from here (`jobs.JobBoard.mark_lost`)
        self.recovered_at = 0.0
        self._lost = False
        self._keys_ready = False

    def dialect(self, ddl: str) -> str:
        # AUTOINCREMENT ids become identity columns; REAL is 4 bytes in PostgreSQL (timestamps need 8)
        ddl = re.sub(r"INTEGER PRIMARY KEY AUTOINCREMENT", "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", ddl)
        return re.sub(r"\bREAL\b", "DOUBLE PRECISION", ddl)

    def _conn(self):
        psycopg = _psycopg()
        conn = getattr(self._local, "conn", None)
        if conn is not None and not conn.closed:
            return conn
        conn = psycopg.connect(
            self.url, autocommit=True, row_factory=_row_factory, connect_timeout=self.connect_timeout_s
        )
        self._local.conn = conn
        with self._all_lock:
            self._all.append(conn)
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()
            with self._all_lock:
                if conn in self._all:
                    self._all.remove(conn)

    def _retrying(self, fn: Callable[[Any], T]) -> T:
        psycopg = _psycopg()
        deadline = time.monotonic() + self.retry_s
        delay = BACKOFF_FIRST_S
        while True:
            conn = None
            try:
                conn = self._conn()
                out = fn(conn)
                if self._lost:
                    self._lost, self.recovered_at = False, time.time()
                return out
            except (psycopg.OperationalError, psycopg.InterfaceError) as err:
                # Only a lost connection is retried; an error the server answered (a lock timeout, a full
                # disk) is the caller's.
                lost = conn is None or conn.closed or conn.broken
                if not lost:
                    raise StoreUnavailable(f"{self.location}: {err}", self.location, str(err)) from None
                self._drop()
                self.retries += 1
                self._lost = True
                if time.monotonic() + delay > deadline:
                    raise StoreUnavailable(
                        f"{self.location} unreachable for {self.retry_s:g} s ($HETFORGE_STATE_RETRY_S): {str(err).strip()}",
                        self.location,
                        str(err),
                    ) from None
                time.sleep(delay)
                delay = min(2 * delay, BACKOFF_MAX_S)
            except (psycopg.IntegrityError, psycopg.ProgrammingError, psycopg.DataError):
                raise  # the caller's SQL or data: a bug to see, not a database to wait for
            except psycopg.DatabaseError as err:  # read-only transaction, out of disk, ...: the write failed, say why
                raise StoreUnavailable(f"{self.location}: {str(err).strip()}", self.location, str(err)) from None

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Result:
        if WRITE.match(sql) and not UPSERT.search(sql):
            return self._once(lambda tx: tx.execute(sql, args))
        return self._retrying(lambda conn: _PgTx(conn).execute(sql, args))

    def atomic(self, fn: Callable[[Tx], T], lock: str = "", rerun_safe: bool = False) -> T:
        """`fn(tx)` in one transaction holding the advisory lock named `lock` (released at commit or rollback)."""
        if not rerun_safe:
            return self._once(fn, lock)

        def run(conn):
            with conn.transaction():
                tx = _PgTx(conn)
                if lock:
                    tx.execute("SELECT pg_advisory_xact_lock(hashtext(?))", (lock,))
                return fn(tx)

        return self._retrying(run)

    def migrate(self, component: str, migrations: Sequence[Migration]) -> None:
        self._ensure_keys()  # every component's store records its writes
        super().migrate(component, migrations)

    def _ensure_keys(self) -> None:
        if not self._keys_ready:
            super().migrate("state", STATE_MIGRATIONS)
            self._keys_ready = True

    def _once(self, fn: Callable[[Tx], T], lock: str = "") -> T:
        """`fn(tx)` committed with its result under a new key; a retry returns the recorded result if the commit landed."""
        self._ensure_keys()
        key, tries = uuid.uuid4().hex, 0

        def run(conn):
            nonlocal tries
            tries += 1
            if tries > 1:  # the last try lost its connection: before its commit, or after it
                row = conn.execute("SELECT result FROM state_writes WHERE key = %s", (key,)).fetchone()
                if row is not None:
                    self.replayed += 1
                    return _decode(row[0])
            with conn.transaction():
                tx = _PgTx(conn)
                if lock:
                    tx.execute("SELECT pg_advisory_xact_lock(hashtext(?))", (lock,))
                out = fn(tx)
                tx.execute(
                    "INSERT INTO state_writes (key, result, at) VALUES (?, ?, ?)", (key, _encode(out), time.time())
                )
            return out

        out = self._retrying(run)
        self._recorded += 1
        if self._recorded % PRUNE_EVERY == 1:
            self._retrying(
                lambda conn: conn.execute("DELETE FROM state_writes WHERE at < %s", (time.time() - KEEP_KEYS_S,))
            )
        return out

    def close(self) -> None:
        with self._all_lock:
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()
