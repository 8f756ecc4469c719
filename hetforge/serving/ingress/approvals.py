"""Variants waiting for a human, and jobs a human asks for (the same operations as `hetforge approvals`).

Admin routes (`AdminRoute`): the audit trail records the API token's holder as the approver or actor."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from hetforge.serving import approvals
from hetforge.serving.ingress.deps import AdminRoute, Identity, Named
from hetforge.serving.ingress.errors import ApiError
from hetforge.serving.ingress.models import ApprovalDecision, ErrorBody, OptimizeRequest, Pending, Queued
from hetforge.serving.jobs import queue_hint_job

router = APIRouter(
    route_class=AdminRoute, responses={code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 415)}
)


@router.get("/v1/pipelines/{name}/approvals", response_model=Pending)
async def pending(state: Named):
    return {"pending": await asyncio.to_thread(approvals.pending, state.registry_path, state.pipeline)}


@router.get("/v1/pipelines/{name}/approvals/{variant_id}")
async def show(variant_id: int, state: Named) -> dict:
    """The verdict's numbers, the job's leaderboard and the diff against the stage's reference."""
    return await asyncio.to_thread(approvals.show, state.registry_path, state.pipeline, state.base_dir, variant_id)


@router.post("/v1/pipelines/{name}/approvals/{variant_id}/{action}")
async def decide(variant_id: int, action: str, body: ApprovalDecision, state: Named, identity: Identity) -> dict:
    """approve: pending_review -> canary (the controller rolls it out); reject: -> rejected. A hint queues a new job."""
    if action not in ("approve", "reject"):
        raise ApiError(404, f"no action {action!r}: approve or reject")
    decide_fn = approvals.approve if action == "approve" else approvals.reject
    return await asyncio.to_thread(
        decide_fn,
        state.registry_path,
        state.pipeline,
        variant_id,
        identity,
        body.hint or "",
        body.note or "",
    )


@router.post("/v1/pipelines/{name}/stages/{stage}/optimize", status_code=202, response_model=Queued)
async def optimize_stage(stage: str, body: OptimizeRequest, state: Named, identity: Identity):
    """Queue an optimization job for a stage with a human's hint (the controller launches it)."""
    job = await asyncio.to_thread(queue_hint_job, state.registry_path, state.pipeline, stage, body.hint or "", identity)
    return {"queued": job.to_json()}
