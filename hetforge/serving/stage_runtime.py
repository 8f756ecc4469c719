"""A model stage at run time: its module, the active variant, and the hot-swap between variants.

The reference module is built once from the stage's `Problem` (`hetforge.spec.stages.stage_problem`): the
team's module with its checkpoint, a HuggingFace model, or a problem file (with the spec's weights file,
else seeded init). Its registry key is `LoadedProblem.fingerprint()`. The active variant
comes from the kernel registry for (stage fingerprint, device class, precision) and is built from
*that* instance (its loaded weights), or is the reference when the registry has none.

Hot-swap: `swap(variant_id, live_inputs)` builds the new variant beside the running one, runs both
on live inputs and compares them within the stage's tolerance; only then is the active module
replaced, by one reference assignment between requests. A request holds the module it started
with, so in-flight requests finish on the old variant. A variant that raises on a request after
the swap is rolled back at once and the request is re-run on the previous module, so the caller
sees no error; the swap is reported `rolled_back`. Nothing restarts.

Rollouts: `start_canary(rollout)` builds a variant under rollout the same way and runs it beside the
active module through a `rollout.CanaryArm` (shadow or a weighted canary, guarded by a comparison
with the active module's answer). Every call's input signature (shapes and dtypes) is counted in a
bounded histogram that the controller reads from the heartbeats, to optimize for what production sees.
"""

from __future__ import annotations

import collections
import threading
import time
import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from hetforge.core.devices import local_device_class
from hetforge.core.precision import serves
from hetforge.core.problem import LoadedProblem, Problem
from hetforge.core.tolerance import compare
from hetforge.kernels.registry import Registry, RegistryError, Variant
from hetforge.optimizer.capture import TRACE_LOCK
from hetforge.optimizer.variants import VariantError, VariantSpec, build_module_variant, build_variant
from hetforge.serving.metrics import Metrics, default_metrics
from hetforge.serving.rollout import CanaryArm, Rollout

REFERENCE = "reference"
CHECK_PAUSE_S = 0.02  # between the live-input batches of a swap check
SIGNATURES_KEPT = 32  # distinct input signatures a replica counts; rarer ones are lumped as "other"


def signature_of(inputs: list | tuple) -> str:
    """`float32[8,16];int64[8]`: the shapes and dtypes of one call's inputs."""
    parts = []
    for x in inputs:
        if isinstance(x, torch.Tensor):
            parts.append(f"{str(x.dtype).removeprefix('torch.')}[{','.join(map(str, x.shape))}]")
        else:
            parts.append(type(x).__name__)
    return ";".join(parts)


class SignatureHistogram:
    """Calls per input signature, at most SIGNATURES_KEPT of them (the least seen is folded into `other`)."""

    def __init__(self, kept: int = SIGNATURES_KEPT):
        self.kept = kept
        self.counts: collections.Counter = collections.Counter()
        self._lock = threading.Lock()

    def add(self, inputs) -> None:
        key = signature_of(inputs)
        with self._lock:
            if key not in self.counts and len(self.counts) >= self.kept:
                rare = min((k for k in self.counts if k != "other"), key=self.counts.__getitem__)
                self.counts["other"] += self.counts.pop(rare)
            self.counts[key] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)


class SwapRefused(Exception):
    """A swap that cannot happen: unknown, unapproved or mismatched variant, or a failed live check."""


@dataclass(frozen=True)
class SwapResult:
    stage: str
    variant: str
    outcome: str  # swapped | refused
    reason: str = ""
    checked_inputs: int = 0
    max_abs_err: float = 0.0


@dataclass
class _Active:
    name: str  # "reference" or "variant:<id>"
    module: nn.Module
    speedup: float = 1.0


class ModelStageRuntime:
    """One replica's model stage: call it with a stage's inputs; swap variants while it serves."""

    def __init__(
        self,
        pipeline: str,
        stage: str,
        problem: Problem,
        device: str = "cpu",
        precision: str = "strict",
        seed: int = 0,
        registry: Registry | None = None,
        device_class: str | None = None,
        metrics: Metrics | None = None,
        use_registry: bool = True,
        max_batch_rows: int = 1,
    ):
        self.pipeline, self.stage, self.device, self.precision = pipeline, stage, device, precision
        self.max_batch_rows = max_batch_rows  # rows a batched call may have: a new variant is warmed on each count
        self.problem = problem
        self.loaded: LoadedProblem = problem.load()
        self.reference = self.loaded.build(seed=seed, device=device)
        self.fingerprint = self.loaded.fingerprint()
        self.device_class = device_class or local_device_class(device)
        self.registry = registry if registry is not None else Registry()
        self.metrics = metrics or default_metrics()
        self._lock = threading.Lock()  # one swap at a time; requests never take it
        self._active = _Active(REFERENCE, self.reference)
        self._previous: _Active | None = None
        self.history: list[SwapResult] = []
        self.recent_inputs: collections.deque = collections.deque(maxlen=4)  # live inputs for the next swap's check
        self.signatures = SignatureHistogram()
        self.arm: CanaryArm | None = None  # a variant under rollout, beside the active module
        if use_registry:
            best = self.registry.best(self.fingerprint, self.device_class, precision)
            if best is not None:
                try:
                    self.swap(best.id, self.example_inputs())
                except SwapRefused:
                    pass  # serve the reference; the refusal is in self.history and the metrics
        self._export_speedup()

    # ------------------------------------------------------------------ serving
    @property
    def active_variant(self) -> str:
        return self._active.name

    def live_inputs(self) -> list[list]:
        """Inputs of the last requests (the problem's example inputs before any request came)."""
        return list(self.recent_inputs) or [self.example_inputs()]

    def example_inputs(self) -> list:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return [x.to(self.device) if isinstance(x, torch.Tensor) else x for x in self.loaded.get_inputs()]

    def __call__(self, *inputs) -> Any:
        active = self._active  # held for the whole call: a swap meanwhile does not touch it
        self.recent_inputs.append(list(inputs))
        self.signatures.add(inputs)
        arm = self.arm
        if arm is not None:
            return arm.call(list(inputs), lambda which, x: self._forward(active if which == "running" else arm, x))[0]
        start = time.perf_counter()
        try:
            with TRACE_LOCK, torch.inference_mode():  # not while this process traces a variant being built
                out = active.module(*inputs)
        except Exception as err:  # noqa: BLE001 - the new variant failed on live traffic: roll back, serve the request
            if active.name == REFERENCE or self._previous is None or self._active is not active:
                raise  # counted in hetforge_stage_errors_total by the ingress, which sees every failed call
            self._rollback(active, f"{type(err).__name__}: {err}")
            return self(*inputs)
        self.metrics.stage_latency.labels(self.pipeline, self.stage, active.name, self.device).observe(
            time.perf_counter() - start
        )
        return out

    def _forward(self, which: _Active | CanaryArm, inputs: list) -> tuple[Any, float]:
        """One timed forward of the active module or the arm's variant (latency metric labelled by variant)."""
        start = time.perf_counter()
        with TRACE_LOCK, torch.inference_mode():  # a failure: the ingress counts the call, the rollout the variant's
            out = which.module(*inputs)
        elapsed = time.perf_counter() - start
        self.metrics.stage_latency.labels(self.pipeline, self.stage, which.name, self.device).observe(elapsed)
        return out, elapsed * 1e3

    # ------------------------------------------------------------------ rollouts
    def start_canary(self, rollout: Rollout) -> CanaryArm:
        """Build the rollout's variant from this replica's module, check it on live inputs, run it beside the active one."""
        with self._lock:
            name, module, _ = self._build(rollout.variant, statuses=("canary", "active"))
            self._check(module, self.live_inputs())
            self._warm(module)
            self.arm = CanaryArm(rollout, name, module, self._disagreement)
        return self.arm

    def stop_canary(self) -> None:
        self.arm = None

    def _disagreement(self, got: Any, want: Any) -> str:
        """ "" when the variant's output matches the running module's within the stage's tolerance, else why not."""
        for g, w in zip(_flat(got), _flat(want), strict=False):
            if not isinstance(w, torch.Tensor):
                continue
            if not isinstance(g, torch.Tensor) or g.shape != w.shape:
                return "a different output structure or shape"
            c = compare(g.detach().cpu(), w.detach().cpu(), self.precision)
            if not c.ok:
                return c.reason
        return ""

    # ------------------------------------------------------------------ hot-swap
    def apply_variant(self, variant: str) -> SwapResult | None:
        """Make `variant` (an id or "reference") active, checked on this replica's live inputs; None when it already is
        (`replica_control.ControlledRuntime`)."""
        if self.active_variant == (REFERENCE if variant == REFERENCE else f"variant:{variant}"):
            return None
        return self.swap(variant, self.live_inputs())

    def swap(self, variant_id: int | str, live_inputs: list[list] | list) -> SwapResult:
        """Check variant `variant_id` (or "reference") on `live_inputs` against the running one, then switch."""
        batches = live_inputs if live_inputs and isinstance(live_inputs[0], (list, tuple)) else [live_inputs]
        with self._lock:
            try:
                name, module, speedup = self._build(variant_id)
                worst = self._check(module, batches)
                if self.arm is None or module is not self.arm.module:
                    self._warm(module)
            except SwapRefused as err:
                result = SwapResult(self.stage, str(variant_id), "refused", str(err))
                self.metrics.kernel_swaps.labels(self.pipeline, self.stage, "refused").inc()
                self.history.append(result)
                raise SwapRefused(f"swap of stage {self.stage} to {variant_id} refused: {err}") from None
            self._previous, self._active = self._active, _Active(name, module, speedup)
            self._export_speedup()
            result = SwapResult(self.stage, name, "swapped", checked_inputs=len(batches), max_abs_err=worst)
            self.metrics.kernel_swaps.labels(self.pipeline, self.stage, "swapped").inc()
            self.history.append(result)
            return result

    def _build(self, variant_id: int | str, statuses: tuple[str, ...] = ("active",)) -> tuple[str, nn.Module, float]:
        if variant_id == REFERENCE:
            return REFERENCE, self.reference, 1.0
        try:
            variant = self.registry.get(int(variant_id))
        except (RegistryError, ValueError) as err:
            raise SwapRefused(f"no variant {variant_id} in the registry ({err})") from None
        self._admissible(variant, statuses)
        arm = self.arm
        if arm is not None and arm.name == f"variant:{variant.id}":
            return (
                arm.name,
                arm.module,
                float(variant.speedup or 1.0),
            )  # promoting the variant under rollout: already built here
        try:
            if variant.recipe.get("kind") == "transform":
                module = build_variant(self.reference, VariantSpec.from_json(variant.recipe), self.example_inputs())
            else:
                source = types.ModuleType(f"hetforge_variant_{variant.id}")
                exec(compile(variant.source, f"<variant {variant.id}>", "exec"), source.__dict__)  # verified code
                module = build_module_variant(
                    source, self.reference, tuple(self.loaded.init_args), self.loaded.init_kwargs
                )
            module = module.to(self.device).eval()
        except (VariantError, Exception) as err:  # noqa: BLE001 - a variant that cannot be built is refused, never fatal
            raise SwapRefused(
                f"variant {variant.id} cannot be built from this replica's module: {type(err).__name__}: {err}"
            ) from None
        return f"variant:{variant.id}", module, float(variant.speedup or 1.0)

    def _admissible(self, variant: Variant, statuses: tuple[str, ...] = ("active",)) -> None:
        if variant.status not in statuses:
            raise SwapRefused(
                f"variant {variant.id} is {variant.status}, not {' or '.join(statuses)} (verified and approved)"
            )
        if variant.fingerprint != self.fingerprint:
            raise SwapRefused(
                f"variant {variant.id} was verified for another reference (fingerprint {variant.fingerprint})"
            )
        if variant.device_class != self.device_class:
            raise SwapRefused(
                f"variant {variant.id} was verified on {variant.device_class}, this replica runs on {self.device_class}"
            )
        if not serves(variant.precision, self.precision):
            raise SwapRefused(
                f"variant {variant.id} needs precision {variant.precision}; the stage allows {self.precision}"
            )

    def _check(self, module: nn.Module, batches: list) -> float:
        """Run the candidate and the running module on live inputs: the outputs must agree."""
        running = self._active.module
        worst = 0.0
        for i, inputs in enumerate(batches):
            if i:
                time.sleep(CHECK_PAUSE_S)  # the check shares the replica's cores with traffic: let requests through
            try:
                with torch.inference_mode():
                    want = running(*inputs)
                    got = module(*inputs)
            except Exception as err:  # noqa: BLE001
                raise SwapRefused(f"the variant raised on live inputs: {type(err).__name__}: {err}") from None
            for g, w in zip(_flat(got), _flat(want), strict=False):
                if not isinstance(w, torch.Tensor):
                    continue
                if not isinstance(g, torch.Tensor):
                    raise SwapRefused("the variant returned a non-tensor where the running module returns a tensor")
                c = compare(g.detach().cpu(), w.detach().cpu(), self.precision)
                if not c.ok:
                    raise SwapRefused(f"the variant disagrees with the running one on live inputs: {c.reason}")
                worst = max(worst, c.max_abs)
        return worst

    def _warm(self, module: nn.Module) -> None:
        """Run a new module once on every shape this replica runs (`_warm_inputs`), here and not on a request: a compiled variant compiles each new shape on first sight (seconds on a CPU), which
        on the request path is a multi-second p99 (seen in bench/e2e before this warm-up existed)."""
        if module is self.reference:
            return
        for inputs in self._warm_inputs():
            try:
                with torch.inference_mode():
                    module(*inputs)
            except Exception as err:  # noqa: BLE001
                raise SwapRefused(
                    f"the variant raised on inputs of signature {signature_of(inputs)}: {type(err).__name__}: {err}"
                ) from None
            time.sleep(CHECK_PAUSE_S)  # the warm-up shares the replica's cores with traffic

    def _warm_inputs(self) -> list[list]:
        """The shapes this replica runs: a HuggingFace stage's buckets (requests are padded to them), else each
        row count of a batched call, from the last live input."""
        if self.problem.hf is not None:
            with torch.random.fork_rng():
                return self.loaded.input_sets(seed=0, device=self.device)
        if self.max_batch_rows <= 1:
            return []
        base = self.live_inputs()[-1]
        return [
            [
                x[:1].repeat(rows, *[1] * (x.dim() - 1))
                if isinstance(x, torch.Tensor) and x.dim() and x.shape[0]
                else x
                for x in base
            ]
            for rows in range(1, self.max_batch_rows + 1)
        ]

    def _rollback(self, failed: _Active, why: str) -> None:
        with self._lock:
            if self._active is failed and self._previous is not None:
                self._active, self._previous = self._previous, None
                self._export_speedup()
                self.metrics.kernel_swaps.labels(self.pipeline, self.stage, "rolled_back").inc()
                self.history.append(SwapResult(self.stage, failed.name, "rolled_back", why[:300]))

    def _export_speedup(self) -> None:
        """The active variant's speedup: one series per stage and device."""
        self.metrics.stage_speedup.labels(self.pipeline, self.stage, self.device).set(self._active.speedup)


def _flat(value: Any) -> list:
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _flat(v)]
    return [value]
