"""Canary rollouts of a pipeline: the latest rollouts and the audit log of their decisions."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from hetforge.serving.ingress.deps import JsonBodyRoute, Named
from hetforge.serving.ingress.models import ErrorBody, Rollouts
from hetforge.serving.rollout import RolloutBoard

router = APIRouter(route_class=JsonBodyRoute, responses={404: {"model": ErrorBody}})


@router.get("/v1/pipelines/{name}/rollouts", response_model=Rollouts)
async def rollouts(state: Named):
    board = RolloutBoard(state.registry_path)
    return {
        "rollouts": [vars(r) for r in await asyncio.to_thread(board.recent, state.pipeline.name, 50)],
        "events": await asyncio.to_thread(board.events, state.pipeline.name),
    }
