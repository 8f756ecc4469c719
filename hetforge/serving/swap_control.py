"""Swap requests to every replica of a stage, without restarting any.

A swap request (`hetforge swap`, the API's admin route, the controller's promotion) is recorded in
the registry's store (`SwapBoard.request`: the record, with its id) and then published as the
stage deployment's Ray Serve `user_config` (`publish`, through `serve_config`): Serve calls
`reconfigure` on every running replica of the stage, and on every replica it starts later before
that replica takes traffic. Each replica checks the variant on its own recent live inputs and
reports its outcome to the store (`replica_control.ReplicaControl`); the requester waits for those
reports. A replica never reads requests from the store, so serving does not depend on it.

The stage config (the deployment's user_config) holds the newest swap request and the stage's
running rollout (`rollout.Rollout.to_config`), both published by whoever changes them:

    {"swap": {"id": 12, "variant": "7"} | None, "rollout": {...} | None}

The replicas' heartbeats, written here, carry each replica's active variant and its histogram of
input signatures, which the controller reads.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from hetforge import state
from hetforge.kernels.registry import Registry, RegistryError
from hetforge.serving import serve_config
from hetforge.serving.boards import Board

_SCHEMA = """
CREATE TABLE IF NOT EXISTS swap_requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    pipeline TEXT NOT NULL, stage TEXT NOT NULL,
    variant TEXT NOT NULL,            -- a variant id, or "reference"
    requested_by TEXT, requested_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS swap_reports (
    request_id INTEGER NOT NULL, replica TEXT NOT NULL,
    outcome TEXT NOT NULL,            -- swapped | refused
    reason TEXT, reported_at REAL NOT NULL,
    PRIMARY KEY (request_id, replica)
);
CREATE TABLE IF NOT EXISTS replicas (  -- heartbeats: which replicas of a stage are alive, and what they run
    pipeline TEXT NOT NULL, stage TEXT NOT NULL, replica TEXT NOT NULL,
    active_variant TEXT NOT NULL, seen_at REAL NOT NULL,
    PRIMARY KEY (pipeline, stage, replica)
);
CREATE TABLE IF NOT EXISTS replica_signatures (  -- calls per input signature since the replica started
    pipeline TEXT NOT NULL, stage TEXT NOT NULL, replica TEXT NOT NULL,
    counts TEXT NOT NULL, seen_at REAL NOT NULL,
    PRIMARY KEY (pipeline, stage, replica)
);
"""
MIGRATIONS = [state.Migration(1, "swap requests, reports, heartbeats", _SCHEMA)]
HEARTBEAT_S = 1.0  # a replica writes its heartbeat this often; one silent for 5 heartbeats is counted gone
CONFIG_LOCK = "hetforge-stage-config"  # serializes the read-modify-write of a Serve application's user_configs


def deployment_name(stage: str) -> str:
    """The Serve deployment of a stage."""
    return f"stage-{stage}"


@dataclass(frozen=True)
class StageConfig:
    """What a stage deployment's user_config asks of its replicas: the newest swap request, the running rollout."""

    swap_id: int | None = None
    swap_variant: str | None = None
    rollout: dict | None = None  # `Rollout.to_config()`

    @classmethod
    def from_json(cls, doc: object) -> StageConfig:
        """The config from a user_config; ValueError naming the field when it is malformed."""
        if doc is None:
            return cls()
        if not isinstance(doc, dict):
            raise ValueError(f"Got {type(doc).__name__} for the stage config: it must be a mapping")
        swap, rollout = doc.get("swap"), doc.get("rollout")
        if swap is not None and not (
            isinstance(swap, dict) and isinstance(swap.get("id"), int) and swap.get("variant")
        ):
            raise ValueError(f'Got "{swap}" for swap: it must be {{"id": <request id>, "variant": <id or reference>}}')
        if rollout is not None and not isinstance(rollout, dict):
            raise ValueError(f'Got "{rollout}" for rollout: it must be a mapping (Rollout.to_config)')
        return cls(swap["id"] if swap else None, str(swap["variant"]) if swap else None, rollout)


def publish(registry_path: str | Path | None, pipeline: str, stage: str, key: str, value: dict | None) -> dict:
    """Set `key` ("swap" or "rollout") of the stage deployment's user_config; Serve reconfigures every replica.

    ConfigPushError when Ray Serve cannot be reached; StoreError when the store's lock cannot be taken
    (it keeps two publishers of one pipeline, and `deploy.redeploy`, from undoing each other's change). The lock
    is held for Serve's round trip (about 0.5 s, bench/serving/swap_latency.md); on SQLite other writers wait for
    it meanwhile, replicas' reports among them, which their reporter thread retries. Setting a key is idempotent,
    so a retry of the transaction may push again.
    """
    store = SwapBoard(registry_path).store

    def push(_tx: state.Tx) -> dict:
        return serve_config.update_user_config(pipeline, deployment_name(stage), lambda c: {**c, key: value})

    return store.atomic(push, lock=CONFIG_LOCK, rerun_safe=True)


@dataclass(frozen=True)
class SwapReport:
    request_id: int
    replica: str
    outcome: str
    reason: str


class SwapBoard(Board):
    """Swap requests and replica reports in the registry's store."""

    COMPONENT, MIGRATIONS = "swaps", MIGRATIONS

    def request(self, pipeline: str, stage: str, variant: str, requested_by: str = "cli") -> int:
        return int(
            self.store.execute(
                "INSERT INTO swap_requests (pipeline, stage, variant, requested_by, requested_at) VALUES (?, ?, ?, ?, ?)"
                " RETURNING id",
                (pipeline, stage, str(variant), requested_by, time.time()),
            ).fetchone()[0]
        )

    def latest(self, pipeline: str, stage: str) -> tuple[int, str] | None:
        row = self.store.execute(
            "SELECT id, variant FROM swap_requests WHERE pipeline = ? AND stage = ? ORDER BY id DESC LIMIT 1",
            (pipeline, stage),
        ).fetchone()
        return (int(row[0]), row[1]) if row else None

    def report(self, request_id: int, replica: str, outcome: str, reason: str = "") -> None:
        self.store.execute(
            "INSERT INTO swap_reports (request_id, replica, outcome, reason, reported_at) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (request_id, replica) DO UPDATE SET outcome = excluded.outcome, reason = excluded.reason,"
            " reported_at = excluded.reported_at",
            (request_id, replica, outcome, reason, time.time()),
        )

    def heartbeat(
        self, pipeline: str, stage: str, replica: str, active_variant: str, signatures: dict[str, int] | None = None
    ) -> None:
        now = time.time()
        self.store.execute(
            "INSERT INTO replicas (pipeline, stage, replica, active_variant, seen_at) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (pipeline, stage, replica) DO UPDATE SET active_variant = excluded.active_variant,"
            " seen_at = excluded.seen_at",
            (pipeline, stage, replica, active_variant, now),
        )
        if signatures is not None:
            self.store.execute(
                "INSERT INTO replica_signatures (pipeline, stage, replica, counts, seen_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (pipeline, stage, replica) DO UPDATE SET counts = excluded.counts, seen_at = excluded.seen_at",
                (pipeline, stage, replica, json.dumps(signatures), now),
            )

    def signatures(self, pipeline: str, stage: str, within_s: float = 5 * HEARTBEAT_S) -> dict[str, dict[str, int]]:
        """replica -> {signature: calls since it started}, for the replicas of a stage heard from within `within_s`."""
        rows = self.store.execute(
            "SELECT replica, counts FROM replica_signatures WHERE pipeline = ? AND stage = ? AND seen_at >= ?",
            (pipeline, stage, time.time() - within_s),
        ).fetchall()
        return {r[0]: json.loads(r[1]) for r in rows}

    def alive(self, pipeline: str, stage: str, within_s: float = 5 * HEARTBEAT_S) -> dict[str, str]:
        """replica -> active variant, for the replicas of a stage heard from within `within_s`."""
        rows = self.store.execute(
            "SELECT replica, active_variant FROM replicas WHERE pipeline = ? AND stage = ? AND seen_at >= ?",
            (pipeline, stage, time.time() - within_s),
        ).fetchall()
        return dict(rows)

    def reports(self, request_id: int) -> list[SwapReport]:
        rows = self.store.execute(
            "SELECT request_id, replica, outcome, reason FROM swap_reports WHERE request_id = ? ORDER BY replica",
            (request_id,),
        ).fetchall()
        return [SwapReport(int(r[0]), r[1], r[2], r[3] or "") for r in rows]

    def recent(self, pipeline: str, limit: int = 20) -> list[dict]:
        """The latest swap requests, newest first, each with its replicas' outcomes."""
        rows = self.store.execute(
            "SELECT id, stage, variant, requested_by, requested_at FROM swap_requests WHERE pipeline = ? "
            "ORDER BY id DESC LIMIT ?",
            (pipeline, limit),
        ).fetchall()
        return [
            {
                "id": r[0],
                "stage": r[1],
                "variant": r[2],
                "requested_by": r[3] or "",
                "at": r[4],
                "reports": [vars(x) for x in self.reports(int(r[0]))],
            }
            for r in rows
        ]

    def wait(self, request_id: int, replicas: int, timeout_s: float, poll_s: float = 0.1) -> list[SwapReport]:
        """The reports once `replicas` replicas answered, or whatever came within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = self.reports(request_id)
            if len(found) >= replicas or time.monotonic() >= deadline:
                return found
            time.sleep(poll_s)


class SwapError(Exception):
    """A swap refused before any replica is asked: `status` is the HTTP status the API answers with."""

    def __init__(self, message: str, status: int):
        super().__init__(message, status)
        self.message, self.status = message, status

    def __str__(self) -> str:
        return self.message


def check_variant(registry_path: str | Path | None, variant: object) -> str:
    """The variant as a request names it ("reference" or an id), or SwapError: missing (404), not active (409)."""
    if variant is None or str(variant) == "":
        raise SwapError('swap refused: give `variant`, a registry variant id or "reference"', 400)
    variant = str(variant)
    if variant != "reference":
        try:
            found = Registry(registry_path).get(int(variant))
        except (RegistryError, ValueError) as err:
            raise SwapError(f"swap refused: no variant {variant} in the registry ({err})", 404) from None
        if found.status != "active":
            raise SwapError(
                f"swap refused: variant {variant} is {found.status}, not active (verified and approved)", 409
            )
    return variant


def request_swap(
    registry_path: str | Path | None, pipeline, stage: str, variant: object, replicas: int, wait_s: float
) -> dict:
    """Check the request, post it, wait for `replicas` reports: {"ok", "request_id", "reports", ...}.

    A store that cannot be read or written is a SwapError with status 503 and the store's message.
    Refused up front (SwapError): an unknown stage, a stage that is not a model stage, a variant that
    is not in the registry or not active (verified and approved). Each replica then checks the variant
    on its own live inputs and reports swapped or refused.
    """
    names = [s.name for s in pipeline.stages]
    if stage not in names:
        raise SwapError(
            f"swap refused: pipeline {pipeline.name} has no stage {stage!r} (stages: {', '.join(names)})", 404
        )
    target = pipeline.stage(stage)
    if target.kind != "model" and getattr(target, "vllm", None) is None:  # vLLM stages have engine-settings variants
        raise SwapError(
            f"swap refused: stage {stage} is a {target.kind} stage; only model and vLLM stages have variants",
            400,
        )
    try:
        variant = check_variant(registry_path, variant)
        board = SwapBoard(registry_path)
        replicas = max(replicas, len(board.alive(pipeline.name, stage)))
        request_id = board.request(pipeline.name, stage, variant, requested_by="api")
        publish(registry_path, pipeline.name, stage, "swap", {"id": request_id, "variant": variant})
        reports = board.wait(request_id, replicas, wait_s)
    except state.StoreError as err:  # the registry cannot be read or written: say so, with its cause
        raise SwapError(f"swap failed: {err}", 503) from None
    except serve_config.ConfigPushError as err:  # recorded, but the replicas cannot be told
        raise SwapError(f"swap {request_id} recorded but not sent to the replicas: {err}", 503) from None
    return {
        "ok": bool(reports) and all(r.outcome == "swapped" for r in reports),
        "request_id": request_id,
        "stage": stage,
        "variant": variant,
        "replicas_expected": replicas,
        "reports": [{"replica": r.replica, "outcome": r.outcome, "reason": r.reason} for r in reports],
    }
