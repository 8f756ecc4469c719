"""LLM agents: candidates written by a language model through any OpenAI-compatible endpoint.

Each agent holds one conversation with a strategy of its own (a swarm runs several in parallel).
The first prompt carries the reference source, the target device's facts, the reference's profile
(top kernels and their share of time), the precision policy, the history of earlier attempts by
every agent and the human hint. Each answer's code is verified like any candidate; the verdict
(compile error, mismatch, timing) goes back into the same conversation as the next turn, so the
model repairs or improves its code. An answer without code, code that does not compile and code
that computes the wrong thing are all rejected candidates, never a crash.

The `openai` package is imported only when an endpoint is configured (the GPU host lacks it).
"""

from __future__ import annotations

import os
import platform
import re
import textwrap
from dataclasses import dataclass, field

import torch
from torch.profiler import ProfilerActivity, profile

from hetforge import config
from hetforge.core.devices import GPU_FACTS, gpu_class
from hetforge.optimizer import verdict as V

STRATEGIES = {
    "fuse": "Fuse chains of operations into as few Triton kernels as possible (GEMM epilogues, "
    "normalization plus pointwise ops, reductions with their prologue); keep cuBLAS/cuDNN for "
    "large matrix products if you cannot beat them.",
    "reexpress": "Look for algebraic re-expressions: fold constants and normalizations into weights "
    "at construction, push reductions through linear maps, replace operations by "
    "cheaper equivalent library calls, drop computation that does not reach the output.",
    "tile": "Write a hand-tiled Triton kernel for the dominant operation, with tile sizes, warps and "
    "pipeline stages chosen for this device's multiprocessors, shared memory and L2.",
}

SYSTEM = """You are a GPU kernel engineer. You rewrite a PyTorch reference module into a faster \
implementation with the same numerics.
Rules:
- Answer with one complete Python file in a ```python block. It must define `class ModelNew(nn.Module)` \
whose constructor takes the same arguments as `Model` and whose `state_dict()` has the same keys and \
shapes (the reference's weights are loaded into it), and whose forward returns the same outputs.
- You may use torch, triton and numpy. No file, network or process access; no caching of results \
between calls (every call gets new input values); no reading of the caller's frames.
- Precision policy: {precision}. {precision_rule}
- Strategy ({name}): {strategy}"""

PRECISION_RULES = {
    "strict": "fp32 results within 1e-4 absolute and relative: TF32 or lower precision math is not "
    "allowed (tf32x3 split products are).",
    "tf32": "TF32 matrix math is allowed; results within 1e-2.",
    "bf16": "bf16 compute with fp32 outputs is allowed; results within 5e-2.",
}


@dataclass
class Attempt:
    """One answer of one agent and what the verifier said of it."""

    agent: str
    turn: int
    status: str  # accepted | rejected | no_code | error
    summary: str  # the verdict in one or two lines (fed back to the model)
    speedup: float | None = None


@dataclass
class Conversation:
    strategy: str
    messages: list[dict] = field(default_factory=list)
    turns: int = 0


def extract_code(answer: str) -> str | None:
    """The last fenced Python block that defines ModelNew (or the last block at all), else None."""
    blocks = re.findall(r"```(?:python|py)?[ \t]*\n(.*?)```", answer or "", flags=re.DOTALL)
    with_model = [b for b in blocks if "class ModelNew" in b]
    chosen = (with_model or blocks or [None])[-1]
    return chosen if chosen and chosen.strip() else None


def device_facts(device: str) -> dict:
    """Name, multiprocessors, memory, L2 and memory bandwidth of the target device."""
    if device != "cuda" or not torch.cuda.is_available():
        return {"name": platform.processor() or platform.machine(), "cores": os.cpu_count(), "kind": "cpu"}
    props = torch.cuda.get_device_properties(0)
    facts = {
        "name": props.name,
        "multiprocessors": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "l2_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
        "capability": f"{props.major}.{props.minor}",
    }
    table = GPU_FACTS.get(gpu_class(props.name))
    if table is not None:
        facts.update(
            bandwidth_gbs=table.bandwidth_gbs,
            fp32_tflops=table.fp32_tflops,
            tf32_tflops=table.tf32_tflops,
            bf16_tflops=table.bf16_tflops,
        )
    return facts


def profile_reference(model: torch.nn.Module, inputs: list, device: str, top: int = 8) -> list[dict]:
    """The reference's top operators (CUDA kernels on a GPU) by self time, with their share."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.no_grad():
        for _ in range(2):
            model(*inputs)
        with profile(activities=activities) as prof:
            for _ in range(3):
                model(*inputs)
            if device == "cuda":
                torch.cuda.synchronize()
    attr = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    total = sum(getattr(e, attr) for e in events) or 1.0
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    return [
        {"name": e.key[:80], "share": round(getattr(e, attr) / total, 3), "us_per_call": round(getattr(e, attr) / 3, 1)}
        for e in events[:top]
    ]


def first_prompt(reference_source: str, facts: dict, profile: list[dict], history: list[Attempt], hint: str) -> str:
    lines = [
        "Reference module (the problem file; `get_inputs()` gives the shapes served):",
        "```python",
        reference_source.rstrip(),
        "```",
        "",
        f"Target device: {facts}",
        "",
        "Profile of the reference (top operators by self time):",
    ]
    lines += [f"- {p['name']}: {p['share'] * 100:.1f}% ({p['us_per_call']} us per call)" for p in profile] or [
        "- (no profile)"
    ]
    if history:
        lines += ["", "Earlier attempts (all agents):"]
        lines += [f"- {a.agent} turn {a.turn}: {a.status}: {a.summary}" for a in history[-12:]]
    if hint:
        lines += ["", f"Hint from a human engineer: {hint}"]
    lines += ["", "Write ModelNew."]
    return "\n".join(lines)


def feedback_prompt(attempt: Attempt, hint: str) -> str:
    if attempt.status == "accepted":
        text = f"The verifier accepted it: {attempt.summary}. Make it faster, keeping it correct."
    elif attempt.status == "no_code":
        text = "Your answer had no Python code block defining ModelNew. Answer with the complete file in one ```python block."
    else:
        text = f"The verifier rejected it: {attempt.summary}. Fix it and answer with the complete file."
    return text + (f"\nHint from a human engineer: {hint}" if hint else "")


def summarize_verdict(verdict: V.Verdict) -> tuple[str, str, float | None]:
    """(status, one-line summary, speedup) of a verdict for the model and the report."""
    if verdict.accepted:
        speed = verdict.speedup
        times = f"reference {verdict.reference_ms} ms, yours {verdict.candidate_ms} ms"
        flags = f"; flags: {'; '.join(verdict.flags)}" if verdict.flags else ""
        return "accepted", f"{speed:.3f}x over the reference ({times}){flags}" if speed else f"correct{flags}", speed
    reason = (
        f"{verdict.reasons[0].kind}: {verdict.reasons[0].message}" if verdict.reasons else "unknown: no reason given"
    )
    return "rejected", textwrap.shorten(reason, 900), None


class LLMClient:
    """A thin wrapper over `openai.OpenAI(...).chat.completions.create` (one place to fake in tests)."""

    def __init__(self, endpoint: dict, timeout_s: float):
        import openai

        self.model = endpoint["model"]
        self._client = openai.OpenAI(
            base_url=endpoint["base_url"], api_key=endpoint["api_key"], timeout=timeout_s, max_retries=1
        )

    def complete(self, messages: list[dict]) -> str:
        reply = self._client.chat.completions.create(model=self.model, messages=messages, temperature=0.2)
        return reply.choices[0].message.content or ""


def unavailable_reason() -> str | None:
    """Why the LLM agents cannot run here (None if they can): the one-line notice."""
    if config.llm_endpoint() is None:
        return "llm agents skipped: no endpoint configured (set HETFORGE_LLM_BASE_URL and HETFORGE_LLM_MODEL)"
    try:
        import openai  # noqa: F401
    except ImportError:
        return "llm agents skipped: the openai package is not installed (pip install 'hetforge[llm]')"
    return None


def system_prompt(strategy: str, precision: str) -> str:
    return SYSTEM.format(
        name=strategy, precision=precision, precision_rule=PRECISION_RULES[precision], strategy=STRATEGIES[strategy]
    )
