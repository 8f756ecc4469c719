"""The pipeline spec: what a user writes in YAML, as pydantic v2 models.

Every model forbids unknown fields and every field has a description and bounds, so that
`hetforge schema` gives editors a complete JSON Schema and the loader can say exactly what a
field must be. Cross-stage checks (references, cycles, reachability) live in
`hetforge.spec.references` and `hetforge.spec.graph`, because they need the whole file.

The whole schema is one file (over 650 lines) on purpose: `hetforge schema` and the loader's messages
follow the models' order, and the stage kinds refer to the shared parts (tensor specs, batching,
replicas) above them; split by concern, a reader would chase each field across modules.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    field_validator,
    model_validator,
)

from hetforge.core.precision import Precision

NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,62}$"
NAME_RULE = "a name of lowercase letters, digits, '_' or '-', starting with a letter, at most 63 characters"

# `package.module:attr` or `relative/file.py:attr` (resolved against the pipeline file's folder).
IMPORT_PATTERN = r"^(?:[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*|[^:\s]+\.py):[A-Za-z_][A-Za-z0-9_]*$"

# GPU models a stage may name as its device. The planner's device table (`hetforge.planners`)
# carries their figures; the spec only needs the names.
GPU_MODELS = ("H100", "H200", "B200", "A100", "A10G", "L4", "L40S", "T4", "V100", "RTX6000-BLACKWELL")
DEVICE_RULE = (
    "auto, cpu, cuda, a GPU model (" + ", ".join(GPU_MODELS) + "), or a named class of CPU nodes "
    "(cpu-<name>, lowercase letters, digits and '-')"
)

# `request`, `request.field.sub`, `stage`, `stage.field`: where a stage argument comes from.
BINDING_PATTERN = r"[a-z][a-z0-9_-]{0,62}(?:\.[A-Za-z_][A-Za-z0-9_]{0,127})*"

DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int8", "uint8", "bool")
DIM_RULE = "a size from 1 to 1048576 or the lowercase name of a dynamic dimension, like batch"


def _dim(value: object) -> int | str:
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 1 << 20:
        return value
    if isinstance(value, str) and re.fullmatch(r"[a-z_][a-z0-9_]{0,31}", value):
        return value
    raise ValueError(DIM_RULE)


Dim = Annotated[Union[int, str], BeforeValidator(_dim), Field(description=DIM_RULE)]


class _Spec(BaseModel):
    """Base of every spec model: unknown fields are errors, values are immutable once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)


class TensorSpec(_Spec):
    """One input of a model stage: its shape (with named dynamic dimensions) and dtype."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$", description="Argument name of the input.")
    shape: list[Dim] = Field(
        min_length=0,
        max_length=8,
        description="Dimensions: positive integers, or names of dynamic dimensions such as 'batch'.",
    )
    dtype: Literal[DTYPES] = Field(default="float32", description="Element type.")  # type: ignore[valid-type]


class Batching(_Spec):
    """Request batching for a model stage (Ray Serve's `serve.batch`)."""

    max_batch_size: int = Field(default=8, ge=1, le=4096, description="Most requests run as one batch.")
    wait_ms: float = Field(default=5.0, ge=0, le=10_000, description="Longest wait to fill a batch, in ms.")


class Autoscaling(_Spec):
    """Replica autoscaling bounds (Ray Serve's autoscaling_config)."""

    min_replicas: int = Field(default=1, ge=0, le=1024, description="Fewest replicas.")
    max_replicas: int = Field(default=4, ge=1, le=1024, description="Most replicas.")
    target_ongoing_requests: float = Field(default=2.0, gt=0, le=10_000, description="Requests per replica to aim for.")

    @model_validator(mode="after")
    def _order(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class StageLimits(_Spec):
    """What one stage accepts and how long the ingress waits for it; unset fields take the defaults named."""

    timeout_s: float | None = Field(
        default=None,
        gt=0,
        le=86_400,
        description="Longest wait for one call of this stage, retries included, in seconds (504 after); "
        "default: only the pipeline's limits.timeout_s.",
    )
    max_concurrency: int | None = Field(
        default=None,
        ge=1,
        le=100_000,
        description="Calls in flight per replica (Ray Serve's max_ongoing_requests); default: 16, or twice the batch "
        "size of a batched model stage, or a tool's `concurrency` when larger.",
    )
    max_queued: int = Field(
        default=64,
        ge=1,
        le=1_000_000,
        description="Calls waiting for a replica, per caller (Ray Serve's max_queued_requests); one more is refused "
        "with 503 and Retry-After instead of queueing without bound.",
    )
    max_tensor_elements: int | None = Field(
        default=None,
        ge=1,
        le=1 << 34,
        description="Model stages: most elements of one input tensor (422 beyond); default: the pipeline's.",
    )
    max_prompt_tokens: int | None = Field(
        default=None,
        ge=1,
        le=10_000_000,
        description="vLLM stages: most prompt tokens (422 before generation); default: the model's context length "
        "less sampling.max_tokens.",
    )


class Fallback(_Spec):
    """What a failed stage's output becomes under `on_error: fallback`: a fixed value, or another stage's answer."""

    value: Any = Field(default=None, description="The stage's output when it fails (any JSON value).")
    stage: str | None = Field(
        default=None, pattern=NAME_PATTERN, description="A stage called with the failed stage's input instead."
    )

    @model_validator(mode="after")
    def _one(self) -> Fallback:
        if ("value" in self.model_fields_set) == (self.stage is not None):
            raise ValueError("a fallback needs exactly one of `value` or `stage`")
        return self


class CircuitBreaker(_Spec):
    """Stop calling a failing stage for a while: its failure policy answers at once instead."""

    failures: int = Field(
        default=5, ge=1, le=10_000, description="Consecutive failed calls (5xx, timeouts) that open the circuit."
    )
    reset_s: float = Field(
        default=30.0,
        gt=0,
        le=86_400,
        description="Seconds the circuit stays open; then one trial call closes it again or reopens it.",
    )


class _StageBase(_Spec):
    """Settings every stage has."""

    name: str = Field(pattern=NAME_PATTERN, description="Stage name, unique in the pipeline: " + NAME_RULE + ".")
    description: str = Field(default="", max_length=2000, description="What the stage does, for people.")
    device: str = Field(
        default="auto",
        description="Where the stage must run: " + DEVICE_RULE + ". `auto` lets the planner choose.",
    )
    prefer_device: str | None = Field(
        default=None, description="A device the planner should prefer when it is not slower: " + DEVICE_RULE + "."
    )
    replicas: int | Autoscaling = Field(default=1, description="A fixed replica count (1-1024) or autoscaling bounds.")
    latency_budget_ms: float | None = Field(
        default=None, gt=0, le=3_600_000, description="This stage's share of the end-to-end latency target, in ms."
    )
    precision: Precision = Field(
        default=Precision.STRICT,
        description="Numerics a faster variant may use: strict (fp32 as written), tf32 (TF32 matmuls), bf16.",
    )
    optimize: bool = Field(default=True, description="Whether hetforge may generate kernels for this stage.")
    args: dict[str, str] | None = Field(
        default=None,
        max_length=64,
        description="The stage's input as named arguments, each bound to `request`, `request.<field>`, `<stage>` or "
        "`<stage>.<field>` (dotted for nesting). Default: the request for the entry stage, the upstream stage's "
        "output for one incoming edge, {stage: output} of the upstream stages that ran for several (a join).",
    )

    retries: int = Field(
        default=0,
        ge=0,
        le=10,
        description="Retries after a failed or timed-out attempt (not after the client's own error or a refusal "
        "for overload); a tool retries inside its replica, each attempt bounded by its timeout_s.",
    )
    on_error: Literal["fail", "skip", "fallback"] = Field(
        default="fail",
        description="When the stage fails after its retries: fail the request, skip the stage (as if its branch "
        "were not taken), or use `fallback`.",
    )
    fallback: Fallback | None = Field(default=None, description="The output under `on_error: fallback`.")
    circuit_breaker: CircuitBreaker | None = Field(
        default=None, description="Stop calling the stage after consecutive failures; absent: always call it."
    )
    limits: StageLimits = Field(default_factory=StageLimits, description="Timeouts, concurrency and input limits.")

    @model_validator(mode="after")
    def _failure_policy(self):
        if (self.on_error == "fallback") != (self.fallback is not None):
            raise ValueError("`fallback` goes with `on_error: fallback`, and `on_error: fallback` needs a `fallback`")
        if self.fallback is not None and self.fallback.stage == self.name:
            raise ValueError("a stage cannot be its own fallback")
        kind = getattr(self, "kind", None)
        if self.limits.max_tensor_elements is not None and kind != "model":
            raise ValueError("limits.max_tensor_elements applies to model stages only")
        if self.limits.max_prompt_tokens is not None and kind != "llm":
            raise ValueError("limits.max_prompt_tokens applies to llm stages only")
        return self

    @field_validator("args")
    @classmethod
    def _args(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for name, ref in (value or {}).items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", name):
                raise ValueError(f"argument name {name!r} is not an identifier")
            if not re.fullmatch(BINDING_PATTERN, ref):
                raise ValueError(
                    f"argument {name}: {ref!r} is not `request`, `request.<field>`, `<stage>` or `<stage>.<field>`"
                )
        return value

    @field_validator("device", "prefer_device")
    @classmethod
    def _device(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return normalize_device(value)

    @field_validator("replicas")
    @classmethod
    def _replicas(cls, value: int | Autoscaling) -> int | Autoscaling:
        if isinstance(value, int) and not 1 <= value <= 1024:
            raise ValueError("a replica count from 1 to 1024, or an autoscaling block")
        return value


def normalize_device(value: str) -> str:
    """Canonical device name (`auto`, `cpu`, `cuda` or an upper-case GPU model), or ValueError."""
    lowered = value.strip().lower()
    if lowered in ("auto", "cpu", "cuda") or re.fullmatch(r"cpu-[a-z0-9][a-z0-9-]{0,30}", lowered):
        return lowered
    for model in GPU_MODELS:
        if lowered == model.lower():
            return model
    raise ValueError(DEVICE_RULE)


class HuggingFaceModel(_Spec):
    """A HuggingFace transformers model served with its tokenizer or processor in the replica."""

    model: str = Field(
        min_length=1,
        max_length=4096,
        description="A model folder saved with save_pretrained (relative to this YAML), or a model id "
        "already in the local HuggingFace cache; nothing is downloaded.",
    )
    task: Literal["embedding", "classification", "audio_encoder", "vision_encoder"] = Field(
        description="embedding: text -> pooled vector; classification: text or (query, document) pairs -> scores "
        "(rerankers, cross-encoders); audio_encoder: audio samples -> pooled vector; vision_encoder: image -> vector."
    )
    pooling: Literal["mean", "cls"] = Field(
        default="mean", description="embedding: mean over tokens, or the first token."
    )
    normalize: bool = Field(default=True, description="embedding: L2-normalize the vector.")
    max_length: int = Field(
        default=128, ge=1, le=32_768, description="Text tasks: tokens per sequence (longer is truncated)."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="Weights and compute dtype."
    )


Bucket = dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,31}$")], Annotated[int, Field(ge=1, le=1 << 20)]]


class ModelStage(_StageBase):
    """A PyTorch module: the team's own class (`module`), a HuggingFace model (`huggingface`), or a problem
    file (Model, get_inputs, get_init_inputs)."""

    kind: Literal["model"] = Field(description="Stage kind.")
    module: str | None = Field(
        default=None,
        pattern=IMPORT_PATTERN,
        description="Import path of the nn.Module class, `package.module:Class` or `file.py:Class`.",
    )
    problem_file: str | None = Field(
        default=None,
        pattern=r"^[^\x00]+\.py$",
        max_length=4096,
        description="A .py file (relative to this YAML) defining Model, get_inputs(), get_init_inputs().",
    )
    init_args: list[Any] | None = Field(
        default=None, max_length=64, description="Positional constructor arguments (default: the problem file's)."
    )
    init_kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword constructor arguments.")
    weights: str | None = Field(
        default=None, max_length=4096, description="A state_dict file (relative to this YAML); else seeded init."
    )
    seed: int = Field(default=0, ge=0, le=2**31 - 1, description="Seed for parameter initialization without weights.")
    inputs: list[TensorSpec] = Field(
        default_factory=list,
        max_length=32,
        description="Input signature; empty means the problem file's get_inputs() defines it.",
    )
    batching: Batching | None = Field(default=None, description="Request batching; none means one request per call.")
    preprocess: str | None = Field(
        default=None,
        pattern=IMPORT_PATTERN,
        description="A function from the stage's JSON input to its input tensors (`file.py:function`); default: one "
        "field per declared input, as nested lists.",
    )
    postprocess: str | None = Field(
        default=None,
        pattern=IMPORT_PATTERN,
        description='A function from the output tensor(s) and the stage input to JSON; default: {"output": nested lists}.',
    )
    labels: list[str] | None = Field(
        default=None,
        min_length=1,
        max_length=100_000,
        description="Class names of a classifier's last dimension: the output then carries `label` and `scores`.",
    )
    huggingface: HuggingFaceModel | None = Field(
        default=None, description="A HuggingFace model (instead of module or problem_file)."
    )
    buckets: list[Bucket] = Field(
        default_factory=list,
        max_length=16,
        description="Serving shapes: sizes of named dimensions (batch, seq, ...) per bucket; requests are padded up to the "
        "smallest bucket that holds them, and every bucket is verified. Empty: batch 1 and the declared sizes.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelStage:
        if (self.module is not None) + (self.problem_file is not None) + (self.huggingface is not None) != 1:
            raise ValueError("a model stage needs exactly one of `module`, `huggingface` or `problem_file`")
        if self.module is not None and not self.inputs:
            raise ValueError("a model stage given by `module` must declare its `inputs`")
        if self.huggingface is not None and (self.inputs or self.preprocess or self.weights):
            raise ValueError("a huggingface stage takes its inputs, preprocessing and weights from its model folder")
        named = {d for i in self.inputs for d in i.shape if isinstance(d, str)}
        if self.huggingface is not None:
            named = {"batch", "seq"} if self.huggingface.task in ("embedding", "classification") else {"batch"}
        most = self.limits.max_concurrency
        if most is not None and self.batching is not None and most < self.batching.max_batch_size:
            raise ValueError(
                f"limits.max_concurrency ({most}) is below batching.max_batch_size ({self.batching.max_batch_size}): "
                "a batch could never fill"
            )
        if self.buckets and self.problem_file is not None:
            raise ValueError("a problem file declares its other input shapes with get_input_variants(), not `buckets`")
        for bucket in self.buckets:
            unknown = sorted(set(bucket) - named)
            if unknown:
                raise ValueError(
                    f"bucket {bucket} names {', '.join(unknown)}, which no input has"
                    f" (named dimensions: {', '.join(sorted(named)) or 'none'})"
                )
        return self


class VllmEngine(_Spec):
    """A language model run by a vLLM engine inside hetforge."""

    model: str = Field(min_length=1, max_length=4096, description="Model folder (relative to this YAML) or name.")
    engine_args: dict[str, Any] = Field(default_factory=dict, description="Extra vllm.EngineArgs, passed as given.")
    chat_template: str | None = Field(
        default=None, max_length=4096, description="Chat template file, if the tokenizer has none."
    )
    prefix_caching: bool = Field(
        default=True,
        description="vLLM's automatic prefix caching: an agent loop's turns reuse the KV cache of the conversation so "
        "far (`engine_args: {enable_prefix_caching: ...}` overrides it).",
    )
    isolate_cores: bool = Field(
        default=True,
        description="On vLLM's CPU engine, when hetforge starts Ray itself: the engine's processes get cores of their "
        "own and Ray, the ingress and the other stages run on the rest (docs/serving.md, CPU cores).",
    )


class Endpoint(_Spec):
    """A language model behind an OpenAI-compatible HTTP API."""

    base_url: str = Field(
        pattern=r"^https?://[^\s]+$", max_length=2048, description="The API's base URL, e.g. http://host:8000/v1."
    )
    model: str = Field(min_length=1, max_length=256, description="Model name the endpoint serves.")
    api_key_env: str | None = Field(
        default=None,
        pattern=r"^[A-Z_][A-Z0-9_]{0,127}$",
        description="Name of the environment variable holding the API key (never the key itself).",
    )
    timeout_s: float = Field(default=60.0, gt=0, le=3600, description="Request timeout in seconds.")


class Sampling(_Spec):
    """Decoding settings of an LLM stage."""

    max_tokens: int = Field(default=128, ge=1, le=131_072, description="Most tokens generated per call.")
    temperature: float = Field(default=0.0, ge=0, le=2, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling mass.")


class AgentLoop(_Spec):
    """An LLM that may call tools and run again with their results."""

    tools: list[str] = Field(min_length=1, max_length=64, description="Names of tool stages the LLM may call.")
    max_iterations: int = Field(ge=1, le=64, description="Most LLM calls in one request, tool rounds between them.")
    tool_choice: Literal["auto", "required"] = Field(
        default="auto",
        description="auto: each turn the model calls tools or answers; required: it calls tools on every turn but "
        "the last allowed, which answers (a fixed number of tool rounds).",
    )


class LlmStage(_StageBase):
    """A language model: a vLLM engine or an OpenAI-compatible endpoint."""

    kind: Literal["llm"] = Field(description="Stage kind.")
    vllm: VllmEngine | None = Field(default=None, description="Serve the model with vLLM.")
    endpoint: Endpoint | None = Field(default=None, description="Call an OpenAI-compatible endpoint.")
    system_prompt: str = Field(default="", max_length=100_000, description="System message sent first.")
    sampling: Sampling = Field(default_factory=Sampling, description="Decoding settings.")
    agent_loop: AgentLoop | None = Field(default=None, description="Tools this LLM may call in a loop.")
    prompt_template: str | None = Field(
        default=None,
        max_length=100_000,
        description="The user message, with {field} replaced by the stage input's fields; default: the input itself "
        "(a string, a `messages` list, or the JSON of the input).",
    )
    choices: list[str] | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="Constrain the answer to one of these strings (a router); the output carries it as `choice`.",
    )
    session_routing: bool = Field(
        default=True,
        description="Send a conversation's turns (the `x-session-id` header, else the conversation's first messages) "
        "to the same replica, where its prefix is cached; another replica when that one is full.",
    )

    @model_validator(mode="after")
    def _one_backend(self) -> LlmStage:
        if (self.vllm is None) == (self.endpoint is None):
            raise ValueError("an llm stage needs exactly one of `vllm` or `endpoint`")
        return self


class HttpTool(_Spec):
    """A tool reached over HTTP: the stage's input is sent as JSON, the JSON answer is its output."""

    url: str = Field(pattern=r"^https?://[^\s]+$", max_length=2048, description="Endpoint URL.")
    method: Literal["GET", "POST"] = Field(default="POST", description="HTTP method.")
    headers_env: dict[str, str] = Field(
        default_factory=dict, description="Header name -> environment variable holding its value."
    )


class ToolStage(_StageBase):
    """Plain code: a Python callable or an HTTP endpoint."""

    kind: Literal["tool"] = Field(description="Stage kind.")
    callable: str | None = Field(
        default=None, pattern=IMPORT_PATTERN, description="`package.module:function` or `file.py:function`."
    )
    http: HttpTool | None = Field(default=None, description="Call an HTTP endpoint.")
    timeout_s: float = Field(default=10.0, gt=0, le=3600, description="Per-attempt timeout in seconds.")
    concurrency: int = Field(default=16, ge=1, le=10_000, description="Most calls in flight per replica.")
    placement: Literal["auto", "inline", "separate"] = Field(
        default="auto",
        description="Where the tool runs: `inline` in its caller's process (the ingress, which runs the pipeline "
        "walk; an agent loop whose tools are all inline runs whole in its LLM stage's replicas, tools included): no "
        "Ray Serve hop per call; `separate` in its own replicas; `auto` as the planner's hop-cost model decides "
        "(`hetforge plan` shows the decision and why).",
    )

    @model_validator(mode="after")
    def _one_target(self) -> ToolStage:
        if (self.callable is None) == (self.http is None):
            raise ValueError("a tool stage needs exactly one of `callable` or `http`")
        if self.placement == "inline" and self.replicas != 1:
            # an inline tool has no replicas of its own: it runs wherever the ingress runs
            raise ValueError("`placement: inline` runs the tool in its caller's process: `replicas` must stay 1")
        if self.placement == "inline" and self.device not in ("auto", "cpu"):
            raise ValueError(
                f"`placement: inline` runs the tool in its caller's process: device {self.device} cannot apply"
            )
        return self


def _stage_kind(value: Any) -> str | None:
    kind = value.get("kind") if isinstance(value, dict) else getattr(value, "kind", None)
    return kind if kind in ("model", "llm", "tool") else None


# Tags are spelled unlike any field name so that error locations can drop them unambiguously.
Stage = Annotated[
    Union[
        Annotated[ModelStage, Tag("<model>")],
        Annotated[LlmStage, Tag("<llm>")],
        Annotated[ToolStage, Tag("<tool>")],
    ],
    Discriminator(
        lambda v: None if _stage_kind(v) is None else f"<{_stage_kind(v)}>",
        custom_error_type="stage_kind",
        custom_error_message="kind must be one of model, llm, tool",
    ),
]


class Condition(_Spec):
    """A branch condition on a field of the upstream stage's JSON output."""

    field: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.]{0,127}$", description="Output field, dotted for nesting.")
    equals: str | int | float | bool | None = Field(
        default=None, description="Take the edge when the field equals this."
    )
    one_of: list[str | int | float | bool] | None = Field(
        default=None, min_length=1, max_length=256, description="Take the edge when the field is one of these."
    )

    @model_validator(mode="after")
    def _one_test(self) -> Condition:
        if (self.equals is None) == (self.one_of is None):
            raise ValueError("a condition needs exactly one of `equals` or `one_of`")
        return self


class Edge(_Spec):
    """Data flow: the `from` stage's output is an input of the `to` stage."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    source: str = Field(alias="from", pattern=NAME_PATTERN, description="Upstream stage name.")
    target: str = Field(alias="to", pattern=NAME_PATTERN, description="Downstream stage name.")
    when: Condition | None = Field(default=None, description="Take this edge only when the condition holds.")


class Slo(_Spec):
    """End-to-end latency target."""

    p99_ms: float = Field(gt=0, le=3_600_000, description="Target 99th-percentile request latency, in ms.")


class Canary(_Spec):
    """How a new variant reaches a stage's traffic: a shadow step, then canary steps, each judged."""

    shadow: bool = Field(
        default=True,
        description="Start with a shadow step: the variant runs on duplicated calls, its answers compared and discarded.",
    )
    steps: list[float] = Field(
        default_factory=lambda: [5.0, 25.0, 100.0],
        min_length=1,
        max_length=10,
        description="Percent of the stage's calls the variant serves at each step, increasing, ending at 100.",
    )
    min_calls: int = Field(
        default=30, ge=5, le=1_000_000, description="Variant calls a step needs before it is judged."
    )
    step_timeout_s: float = Field(
        default=300.0, gt=0, le=86_400, description="A step without enough calls by then is rolled back."
    )
    max_latency_ratio: float = Field(
        default=1.0,
        gt=0,
        le=10,
        description="Promote only when the variant's p50 is at most this times the running one's.",
    )
    max_p99_ratio: float = Field(
        default=1.5,
        gt=0,
        le=100,
        description="... and its tail at most this times the running one's (p99 once each arm has 100 calls in the step, p90 before).",
    )
    max_error_rate: float = Field(default=0.0, ge=0, le=1, description="Largest share of variant calls that may raise.")
    guard: bool = Field(
        default=True,
        description="Check every answer the variant serves against the running module before returning it; a disagreement "
        "returns the running module's answer and rolls the variant back. Costs a second run on canary calls only.",
    )

    @field_validator("steps")
    @classmethod
    def _steps(cls, value: list[float]) -> list[float]:
        if any(not 0 < v <= 100 for v in value) or any(b <= a for a, b in zip(value, value[1:])) or value[-1] != 100:
            raise ValueError("steps are increasing percentages in (0, 100] ending at 100, for example [5, 25, 100]")
        return value


class Reoptimize(_Spec):
    """Background re-optimization in production: when to start a job, how to roll its result out."""

    interval_s: float = Field(
        default=30.0, ge=0.2, le=86_400, description="How often the controller looks at the metrics."
    )
    window_s: float = Field(default=120.0, ge=1, le=86_400, description="The span of metrics each look judges.")
    min_calls: int = Field(
        default=20, ge=1, le=1_000_000, description="A stage with fewer calls in the window is not judged."
    )
    hot_share: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="Optimize a model stage whose share of the measured critical path reaches this.",
    )
    regression: float = Field(
        default=1.5,
        gt=1,
        le=100,
        description="Optimize again when a stage's p50 reaches this times its p50 after the last rollout.",
    )
    new_shape_share: float = Field(
        default=0.25,
        gt=0,
        le=1,
        description="Optimize again when an input signature no job has seen reaches this share of calls.",
    )
    budget_s: float = Field(default=300.0, gt=0, le=86_400, description="Wall-time budget of one optimization job.")
    agents: list[Literal["recipes", "rewrites", "library", "llm"]] = Field(
        default_factory=lambda: ["recipes", "rewrites", "library"],
        min_length=1,
        max_length=4,
        description="Agents a job runs.",
    )
    concurrency: int = Field(
        default=1, ge=1, le=64, description="Most optimization jobs running at once for this pipeline."
    )
    job_cpus: float = Field(
        default=1.0, gt=0, le=256, description="CPUs one job takes (its Ray task's num_cpus, and its threads)."
    )
    approval: Literal["auto", "manual"] = Field(
        default="auto",
        description="manual: every new variant waits for `hetforge approvals approve` before its rollout.",
    )
    canary: Canary = Field(default_factory=Canary, description="The rollout of a new variant.")


class OpenAiApi(_Spec):
    """The pipeline on the ingress's OpenAI-compatible routes (its output stage must be an LLM)."""

    models: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        min_length=1,
        max_length=64,
        description="The `model` names this pipeline answers on /v1/chat/completions and lists on /v1/models "
        "(default: the pipeline's name).",
    )


class PipelineLimits(_Spec):
    """What one request may be and take, for the whole pipeline; the ingress refuses the rest with its own status."""

    max_body_bytes: int = Field(
        default=16 << 20, ge=1024, le=1 << 30, description="Largest request body in bytes (413 beyond)."
    )
    max_tensor_elements: int = Field(
        default=4 << 20,
        ge=1,
        le=1 << 34,
        description="Most elements of one input tensor of a model stage (422 beyond); a stage's limits may differ.",
    )
    timeout_s: float = Field(
        default=120.0, gt=0, le=86_400, description="Longest time one request may take, in seconds (504 after)."
    )
    max_concurrent_requests: int = Field(
        default=256,
        ge=1,
        le=100_000,
        description="Pipeline requests in flight per ingress replica; one more is refused with 503 and Retry-After.",
    )
    retry_after_s: int = Field(
        default=1, ge=1, le=3600, description="The Retry-After (seconds) of a 503 for overload or an open circuit."
    )


class Auth(_Spec):
    """Who may call the pipeline's routes. Admin routes and the API docs always need the API token."""

    pipeline_routes: Literal["open", "token"] = Field(
        default="open",
        description="token: run, status, chat completions, dashboards and rollouts also need the API token "
        "(`Authorization: Bearer`); /healthz and /metrics stay open.",
    )


class Pipeline(_Spec):
    """A whole agent pipeline: stages, the data flow between them, and its targets."""

    # Where each stage is declared (`FILE:LINE`), set by the loader: errors raised later by a stage's own code
    # (an import, a constructor) name the line the user wrote. Not part of the schema.
    _stage_lines: dict[str, str] = PrivateAttr(default_factory=dict)

    def where(self, stage: str) -> str:
        """`FILE:LINE` of the stage named `stage` in the file it was loaded from ("" when not loaded from one)."""
        return self._stage_lines.get(stage, "")

    def set_stage_lines(self, lines: dict[str, str]) -> Pipeline:
        """Remember where each stage is declared (`where`): the loader does; a process that rebuilds the pipeline
        from a dict passes the lines the loader found."""
        self._stage_lines = dict(lines)
        return self

    name: str = Field(pattern=NAME_PATTERN, description="Pipeline name: " + NAME_RULE + ".")
    description: str = Field(default="", max_length=10_000, description="What the pipeline does, for people.")
    entry: str = Field(pattern=NAME_PATTERN, description="The stage that receives each request.")
    output: str = Field(pattern=NAME_PATTERN, description="The stage whose result answers the request.")
    slo: Slo | None = Field(default=None, description="End-to-end latency target.")
    stages: list[Stage] = Field(min_length=1, max_length=512, description="The stages.")
    flow: list[Edge] = Field(default_factory=list, max_length=4096, description="Data flow edges between stages.")
    reoptimize: Reoptimize | None = Field(
        default=None, description="Re-optimize hot stages in the background while serving; absent: never."
    )
    openai: OpenAiApi | None = Field(
        default=None, description="Model names the OpenAI-compatible routes answer for this pipeline."
    )
    limits: PipelineLimits = Field(default_factory=PipelineLimits, description="Request size, time and concurrency.")
    auth: Auth = Field(default_factory=Auth, description="Which routes need the API token besides the admin ones.")

    def stage(self, name: str) -> ModelStage | LlmStage | ToolStage:
        """The stage called `name`; KeyError if there is none."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)
