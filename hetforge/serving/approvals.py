"""Human approval of variants that background jobs found: list, show (report and diff), approve, reject.

A variant waits for a human when the pipeline's `reoptimize.approval` is `manual` or when its verdict
needs review; it is then `pending_review` in the registry. Approving makes it `canary` (the
controller rolls it out on its next look); rejecting makes it `rejected`. Either may carry a hint,
which queues a new job for the stage with the hint in every agent's prompt. The CLI (`hetforge
approvals`) and the API (`/v1/pipelines/{name}/approvals`) call these same functions, and every
decision goes into the rollout audit log with the approver's name.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from hetforge.kernels.registry import Registry, RegistryError, Variant
from hetforge.serving.jobs import JobBoard, queue_hint_job
from hetforge.serving.rollout import RolloutBoard
from hetforge.serving.swap_control import SwapError
from hetforge.spec.stages import stage_problem


def _stage_of(pipeline, registry: Registry, variant: Variant, base_dir: Path | None) -> str | None:
    """The pipeline's model stage this variant was found for (by the job that registered it, else by fingerprint)."""
    for job in JobBoard(registry.path).list(pipeline.name):
        if job.variant_id == variant.id:
            return job.stage
    if base_dir is None:
        return None
    for stage in pipeline.stages:
        if stage.kind != "model":
            continue
        try:
            fingerprint = stage_problem(stage, base_dir).load().fingerprint()
        except Exception:  # noqa: BLE001 - a stage whose code does not load now cannot be the variant's
            continue
        if fingerprint == variant.fingerprint:
            return stage.name
    return None


def _job_of(registry_path, pipeline, variant_id: int):
    return next((j for j in JobBoard(registry_path).list(pipeline.name) if j.variant_id == variant_id), None)


def pending(registry_path, pipeline) -> list[dict]:
    """Variants of this pipeline's jobs waiting for a human."""
    registry = Registry(registry_path)
    out = []
    for job in JobBoard(registry_path).list(pipeline.name, states=("done",)):
        if job.variant_id is None:
            continue
        variant = registry.get(job.variant_id)
        if variant.status == "pending_review":
            out.append(
                {
                    "variant_id": variant.id,
                    "stage": job.stage,
                    "job_id": job.id,
                    "name": variant.name,
                    "agent": variant.agent,
                    "speedup": variant.speedup,
                    "flags": variant.verdict.get("flags", []),
                    "trigger": job.trigger,
                    "created_at": variant.created_at,
                }
            )
    return out


def show(registry_path, pipeline, base_dir: Path, variant_id: int) -> dict:
    """Everything a reviewer needs: the verdict's numbers, flags and errors, the job's leaderboard, the diff
    of the variant's source against the stage's reference (`base_dir`: the pipeline file's folder)."""
    registry = Registry(registry_path)
    variant = _get(registry, variant_id)
    job = _job_of(registry_path, pipeline, variant.id)
    stage_name = job.stage if job else _stage_of(pipeline, registry, variant, Path(base_dir))
    reference_source = ""
    if stage_name is not None:
        stage = pipeline.stage(stage_name)
        module_file = stage.module.rpartition(":")[0] if stage.module and ".py:" in stage.module else None
        source_file = stage.problem_file or module_file  # a HuggingFace stage's reference is the library's code
        try:
            reference_source = (Path(base_dir) / source_file).read_text() if source_file else ""
        except OSError:
            pass
    diff = "".join(
        difflib.unified_diff(
            reference_source.splitlines(keepends=True),
            variant.source.splitlines(keepends=True),
            "reference",
            f"variant {variant.id} ({variant.name})",
        )
    )
    verdict = variant.verdict
    return {
        "variant": variant.summary(),
        "stage": stage_name,
        "job": job.to_json() if job else None,
        "verdict": {
            k: verdict.get(k)
            for k in (
                "verdict",
                "speedup",
                "reference_ms",
                "candidate_ms",
                "flags",
                "reasons",
                "trials",
                "device",
                "precision",
                "needs_review",
                "confinement",
            )
        },
        "recipe": variant.recipe,
        "diff": diff,
        "source": variant.source,
    }


def approve(registry_path, pipeline, variant_id: int, approver: str, hint: str = "", note: str = "") -> dict:
    """pending_review -> canary: the controller rolls it out. A hint also queues a new job for the stage."""
    return _decide(registry_path, pipeline, variant_id, "canary", "approve", approver, hint, note)


def reject(registry_path, pipeline, variant_id: int, approver: str, hint: str = "", note: str = "") -> dict:
    """pending_review -> rejected. A hint queues a new job for the stage with it."""
    return _decide(registry_path, pipeline, variant_id, "rejected", "reject", approver, hint, note)


def _decide(
    registry_path, pipeline, variant_id: int, status: str, decision: str, approver: str, hint: str, note: str
) -> dict:
    registry = Registry(registry_path)
    variant = _get(registry, variant_id)
    if variant.status != "pending_review":
        raise SwapError(
            f"variant {variant_id} is {variant.status}: only pending_review variants wait for approval", 409
        )
    job = _job_of(registry_path, pipeline, variant.id)
    stage = job.stage if job else _stage_of(pipeline, registry, variant, None)
    if stage is None:
        raise SwapError(f"variant {variant_id} does not belong to a stage of pipeline {pipeline.name}", 404)
    registry.set_status(variant.id, status, approver=approver)
    RolloutBoard(registry_path).record(
        pipeline.name,
        stage,
        decision,
        variant=str(variant.id),
        numbers={"speedup": variant.speedup},
        reason=note or hint,
        actor=approver,
    )
    out = {"variant_id": variant.id, "stage": stage, "status": status, "approver": approver}
    if hint.strip():
        out["queued_job"] = queue_hint_job(registry_path, pipeline, stage, hint, actor=approver).id
    return out


def _get(registry: Registry, variant_id: int) -> Variant:
    try:
        return registry.get(int(variant_id))
    except (RegistryError, ValueError) as err:
        raise SwapError(str(err), 404) from None
