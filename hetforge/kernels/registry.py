"""The kernel registry: verified variants of stages, looked up by (stage fingerprint, device class,
precision policy), in the state store (`hetforge.state`): an SQLite file by default, PostgreSQL for
clusters ($HETFORGE_STATE_URL or a postgresql:// location).

Every write is one statement or one transaction, so concurrent writers from several processes
neither lose nor corrupt rows, and a crash mid-write leaves the previous state. A store that cannot
be read or written raises `hetforge.state.StoreError` naming the database and the cause. A variant
flagged `needs_review` is stored as `pending_review` and is never returned by `best()` until a
human approves it. A variant found by a background job in production is stored as `canary`: verified,
waiting for (or in) its rollout, and served only by that rollout until it is promoted to `active`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from hetforge import state
from hetforge.core.precision import serving_policies

STATUSES = ("active", "pending_review", "canary", "rejected", "retired")

MIGRATIONS = [
    state.Migration(
        1,
        "variants",
        """
CREATE TABLE IF NOT EXISTS variants (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    fingerprint TEXT NOT NULL,      -- the reference stage's fingerprint (code, arguments, signature)
    device_class TEXT NOT NULL,     -- cpu, H100, ...
    precision TEXT NOT NULL,        -- strict | tf32 | bf16
    name TEXT NOT NULL,             -- human label, e.g. "bn_folded"
    agent TEXT NOT NULL,            -- who proposed it: recipes, rewrites, library, llm, human
    source TEXT NOT NULL,           -- candidate file text (defines ModelNew)
    recipe TEXT NOT NULL,           -- JSON: how to build it (compile mode, rewrites, kernels)
    signature TEXT NOT NULL,        -- JSON: input shapes and dtypes it was verified on
    verdict TEXT NOT NULL,          -- JSON: the verifier's full verdict
    reference_ms REAL, candidate_ms REAL, speedup REAL,
    status TEXT NOT NULL,
    approver TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS variants_lookup ON variants (fingerprint, device_class, precision, status);
""",
    ),
]


class RegistryError(Exception):
    """A registry operation cannot be done (unknown id, a rejected verdict, a bad status)."""


@dataclass(frozen=True)
class Variant:
    id: int
    fingerprint: str
    device_class: str
    precision: str
    name: str
    agent: str
    source: str
    recipe: dict
    signature: dict
    verdict: dict
    reference_ms: float | None
    candidate_ms: float | None
    speedup: float | None
    status: str
    approver: str | None
    created_at: float
    updated_at: float

    def summary(self) -> dict:
        """Everything but the source and the full verdict."""
        out = asdict(self)
        out.pop("source")
        out.pop("verdict")
        return out


def default_path() -> str | Path:
    """The default registry: $HETFORGE_STATE_URL when set, else $HETFORGE_HOME/registry.sqlite."""
    return state.default_location()


class Registry:
    """Verified variants in the state store (an SQLite file or a PostgreSQL database)."""

    def __init__(self, path: str | Path | None = None):
        self.path = state.location_of(path)  # a file path, or a postgresql:// URL
        self.store = state.open_store(self.path, "registry", MIGRATIONS)

    def add(
        self,
        *,
        fingerprint: str,
        device_class: str,
        precision: str,
        name: str,
        agent: str,
        source: str,
        verdict: dict,
        recipe: dict | None = None,
        signature: dict | None = None,
        status: str | None = None,
    ) -> Variant:
        """Store an accepted variant: `active` (or `status`), but `pending_review` when its verdict needs review."""
        if verdict.get("verdict") != "accepted":
            # Only the verifier's acceptance admits a variant; a rejected one is evidence, not a kernel.
            raise RegistryError(f"variant {name!r} was {verdict.get('verdict')}: only accepted variants are registered")
        if status is not None and status not in STATUSES:
            raise RegistryError(f'Got "{status}" for status: one of {", ".join(STATUSES)}.')
        status = "pending_review" if verdict.get("needs_review") else (status or "active")
        now = time.time()
        new_id = self.store.execute(
            "INSERT INTO variants (fingerprint, device_class, precision, name, agent, source, recipe, signature, verdict,"
            " reference_ms, candidate_ms, speedup, status, approver, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, ?) RETURNING id",
            (
                fingerprint,
                device_class,
                precision,
                name,
                agent,
                source,
                json.dumps(recipe or {}),
                json.dumps(signature or {}),
                json.dumps(verdict),
                verdict.get("reference_ms"),
                verdict.get("candidate_ms"),
                verdict.get("speedup"),
                status,
                now,
                now,
            ),
        ).fetchone()[0]
        return self.get(new_id)

    def get(self, variant_id: int) -> Variant:
        row = self.store.execute("SELECT * FROM variants WHERE id = ?", (variant_id,)).fetchone()
        if row is None:
            raise RegistryError(f"no variant with id {variant_id}")
        return _variant(row)

    def list(
        self, fingerprint: str | None = None, device_class: str | None = None, status: str | None = None
    ) -> list[Variant]:
        clauses, args = [], []
        for column, value in (("fingerprint", fingerprint), ("device_class", device_class), ("status", status)):
            if value is not None:
                clauses.append(f"{column} = ?")
                args.append(value)
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        rows = self.store.execute(f"SELECT * FROM variants{where} ORDER BY id", args).fetchall()
        return [_variant(r) for r in rows]

    def best(self, fingerprint: str, device_class: str, precision: str) -> Variant | None:
        """The fastest active variant for a stage on a device class under a precision policy.

        A variant verified under a stricter policy serves a looser one (strict serves tf32 and bf16).
        """
        allowed = serving_policies(precision)
        marks = ",".join("?" * len(allowed))
        # NULLS LAST: PostgreSQL sorts NULL first under DESC, SQLite last; a variant with no speedup never wins
        row = self.store.execute(
            f"SELECT * FROM variants WHERE fingerprint = ? AND device_class = ? AND precision IN ({marks}) AND status = 'active'"
            " ORDER BY speedup DESC NULLS LAST, id DESC LIMIT 1",
            (fingerprint, device_class, *allowed),
        ).fetchone()
        return _variant(row) if row else None

    def set_status(self, variant_id: int, status: str, approver: str | None = None) -> Variant:
        """Approve (active), reject, or retire a variant; records who did it."""
        if status not in STATUSES:
            raise RegistryError(f'Got "{status}" for status: one of {", ".join(STATUSES)}.')
        cur = self.store.execute(
            "UPDATE variants SET status = ?, approver = COALESCE(?, approver), updated_at = ? WHERE id = ?",
            (status, approver, time.time(), variant_id),
        )
        if cur.rowcount == 0:
            raise RegistryError(f"no variant with id {variant_id}")
        return self.get(variant_id)

    def export(self, variant_id: int, out_dir: str | Path) -> tuple[Path, Path]:
        """Write a variant as a candidate file (ModelNew) plus its metadata JSON."""
        variant = self.get(variant_id)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        source_path = out / f"variant_{variant.id}_{variant.name}.py"
        meta_path = out / f"variant_{variant.id}_{variant.name}.json"
        source_path.write_text(variant.source)
        meta_path.write_text(json.dumps({**variant.summary(), "verdict": variant.verdict}, indent=2, default=str))
        return source_path, meta_path


def _variant(row) -> Variant:
    d = dict(row)
    for key in ("recipe", "signature", "verdict"):
        d[key] = json.loads(d[key])
    return Variant(**d)
