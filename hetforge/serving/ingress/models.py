"""Request and response bodies of the ingress.

Requests forbid unknown fields (a misspelt field is the client's 400, not silently ignored), except
the OpenAI-compatible chat request: OpenAI clients send sampling fields (temperature, max_tokens,
...) that a pipeline takes from its spec, and refusing them would break those clients.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Response(BaseModel):
    model_config = ConfigDict(extra="allow")


# ---------------------------------------------------------------------------------------------- requests
class RunRequest(Request):
    input: Any = Field(description="The entry stage's input.")
    stream: bool = Field(default=False, description="Answer with server-sent events (the output stage must be an LLM).")


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    messages: list[dict[str, Any]] = Field(
        min_length=1, description="A non-empty list of {role, content}: the entry stage's input."
    )
    model: str | None = Field(default=None, description="Echoed in the answer; the pipeline's name when absent.")
    stream: bool = Field(default=False, description="Answer with chat.completion.chunk events.")


class SwapRequest(Request):
    variant: str | int | None = Field(default=None, description='A registry variant id, or "reference".')
    wait_s: float = Field(
        default=30.0, ge=0, le=3600, description="How long to wait for every replica's report, in seconds."
    )


class ApprovalDecision(Request):
    """The approver the audit log records is the API token's holder, never a name the body gives."""

    hint: str | None = Field(
        default=None, description="Queues a new job for the stage with this text in every agent's prompt."
    )
    note: str | None = Field(default=None, description="Why, for the audit log.")


class OptimizeRequest(Request):
    """The actor the audit log records is the API token's holder."""

    hint: str | None = Field(default=None, description="The text that goes into every agent's prompt.")


# ---------------------------------------------------------------------------------------------- responses
class ErrorDetail(BaseModel):
    message: str
    stage: str | None
    request_id: str
    status: int


class ErrorBody(BaseModel):
    """Every refusal's body."""

    error: ErrorDetail


class RunResponse(Response):
    request_id: str
    output: Any
    stages: dict[str, float] = Field(description="Milliseconds per stage that ran.")
    skipped: list[str]
    failed: dict[str, str] = Field(
        default_factory=dict,
        description="Stages that failed and were skipped or replaced by their fallback: the error.",
    )


class Health(Response):
    status: str
    pipeline: str
    waiting_for: list[str] | None = Field(
        default=None, description="Stages that do not answer yet (only while starting)."
    )
    dependencies: list[dict[str, Any]] | None = Field(
        default=None, description="Outside dependencies that fail their check (status degraded): endpoints, API keys."
    )
    open_circuits: list[str] | None = Field(
        default=None, description="Stages whose circuit breaker is open on this ingress replica (status degraded)."
    )


class SwapReport(BaseModel):
    replica: str
    outcome: str
    reason: str


class SwapResult(Response):
    ok: bool
    request_id: int
    stage: str
    variant: str
    replicas_expected: int
    reports: list[SwapReport]


class PipelineStatus(Response):
    pipeline: str
    stages: dict[str, dict[str, Any]]
    reoptimize: dict[str, Any] | None = None


class Pending(Response):
    pending: list[dict[str, Any]]


class Queued(Response):
    queued: dict[str, Any]


class Rollouts(Response):
    rollouts: list[dict[str, Any]]
    events: list[dict[str, Any]]
