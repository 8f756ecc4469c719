"""The metrics contract: names, help texts and labels that the dashboards query.

Names follow `hetforge_<what>_<unit>`; labels are few and bounded (pipeline, stage, variant,
device, outcome, kind). `tests/serving/test_stage_runtime.py` pins them, and every query of the dashboards
(`hetforge/serving/dashboards.py`) is checked against a live Prometheus in
`tests/serving/test_reoptimize_e2e.py`: renaming one breaks the dashboards.
Each process records its own; under Ray Serve the replicas write prometheus_client's multiprocess
files into one folder (`PROMETHEUS_MULTIPROC_DIR`) and the ingress's /metrics aggregates them.
The speedup gauge has no variant label: one series per stage and device, whatever is active
(a stale per-variant series cannot be removed from multiprocess files).
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.multiprocess import MultiProcessCollector

from hetforge.serving.dataflow import FAILURE_KINDS

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

SPEC = {  # name -> (kind, help, labels)
    "hetforge_pipeline_request_latency_seconds": (
        "histogram",
        "End-to-end latency of one pipeline request.",
        ("pipeline",),
    ),
    "hetforge_stage_latency_seconds": (
        "histogram",
        "Latency of one stage call.",
        ("pipeline", "stage", "variant", "device"),
    ),
    "hetforge_pipeline_requests_total": (
        "counter",
        "Pipeline requests, by outcome (ok | error).",
        ("pipeline", "outcome"),
    ),
    "hetforge_stage_errors_total": (
        "counter",
        "Failed stage calls, counted once per call by the process that made it (the ingress; an LLM replica for its agent "
        "loop's calls), by kind "
        "(binding | client | timeout | overload | circuit_open | error).",
        ("pipeline", "stage", "kind"),
    ),
    "hetforge_stage_speedup_ratio": (
        "gauge",
        "Active variant's verified speedup over the stage's reference (1 for the reference).",
        ("pipeline", "stage", "device"),
    ),
    "hetforge_kernel_swaps_total": (
        "counter",
        "Kernel hot-swaps, by outcome (swapped | refused | rolled_back).",
        ("pipeline", "stage", "outcome"),
    ),
    # Set once by the ingress: where the planner put each stage, and the pipeline's latency target.
    "hetforge_stage_placement_info": (
        "gauge",
        "1 for the device class and device the planner placed a stage on.",
        ("pipeline", "stage", "kind", "device_class", "device"),
    ),
    "hetforge_pipeline_slo_seconds": (
        "gauge",
        "The pipeline's end-to-end latency target (quantile 0.99: the spec's slo.p99_ms).",
        ("pipeline", "quantile"),
    ),
}
# Written by the re-optimization controller (only pipelines with a `reoptimize:` block have these series).
CONTROL_SPEC = {
    "hetforge_rollout_decisions_total": (
        "counter",
        "Rollout decisions (start | advance | promote | rollback | resume).",
        ("pipeline", "stage", "decision"),
    ),
    "hetforge_canary_weight_percent": (
        "gauge",
        "Percent of a stage's calls its variant under rollout serves (0: none; shadow: 0).",
        ("pipeline", "stage"),
    ),
    "hetforge_optimizer_jobs_total": (
        "counter",
        "Background optimization jobs, by outcome (started | registered | no_gain | failed).",
        ("pipeline", "stage", "outcome"),
    ),
    "hetforge_optimizer_speedup_ratio": (
        "gauge",
        "The last job's winner over eager and over torch.compile (baseline eager | compile), both at the stage's "
        "precision policy, as the judge measured them.",
        ("pipeline", "stage", "baseline"),
    ),
    "hetforge_optimizer_candidates_total": (
        "counter",
        "Candidates judged by background jobs: accepted, needs_review, skipped, or rejected:<reason kind>.",
        ("pipeline", "stage", "outcome"),
    ),
}


class Metrics:
    """One set of the hetforge metrics on a prometheus_client registry (the process default unless given)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        registry = registry if registry is not None else REGISTRY
        made = {}
        for name, (kind, help_text, labels) in {**SPEC, **CONTROL_SPEC}.items():
            if kind == "histogram":
                made[name] = Histogram(name, help_text, labels, buckets=LATENCY_BUCKETS_S, registry=registry)
            elif kind == "counter":
                made[name] = Counter(name.removesuffix("_total"), help_text, labels, registry=registry)
            else:
                # Under prometheus_client's multiprocess mode (Ray Serve replicas), the most recent value of live
                # processes is the one shown; in a single process the mode is ignored.
                made[name] = Gauge(name, help_text, labels, registry=registry, multiprocess_mode="livemostrecent")
        self.pipeline_latency = made["hetforge_pipeline_request_latency_seconds"]
        self.stage_latency = made["hetforge_stage_latency_seconds"]
        self.pipeline_requests = made["hetforge_pipeline_requests_total"]
        self.stage_errors = made["hetforge_stage_errors_total"]
        self.stage_speedup = made["hetforge_stage_speedup_ratio"]
        self.kernel_swaps = made["hetforge_kernel_swaps_total"]
        self.stage_placement = made["hetforge_stage_placement_info"]
        self.pipeline_slo = made["hetforge_pipeline_slo_seconds"]
        self.rollout_decisions = made["hetforge_rollout_decisions_total"]
        self.canary_weight = made["hetforge_canary_weight_percent"]
        self.optimizer_jobs = made["hetforge_optimizer_jobs_total"]
        self.optimizer_candidates = made["hetforge_optimizer_candidates_total"]
        self.optimizer_speedup = made["hetforge_optimizer_speedup_ratio"]
        self.registry = registry

    def zero_serving_series(self, pipeline: str, stages: list[str], model_stages: list[str]) -> None:
        """Create the serving series of known label values at 0 (the Prometheus convention): a panel then shows 0
        rather than nothing, and `increase()` sees the first swap or error (a series born at 1 has no increase)."""
        for outcome in ("ok", "error"):
            self.pipeline_requests.labels(pipeline, outcome)
        for stage in stages:
            for kind in FAILURE_KINDS:
                self.stage_errors.labels(pipeline, stage, kind)
        for stage in model_stages:
            for outcome in ("swapped", "refused", "rolled_back"):
                self.kernel_swaps.labels(pipeline, stage, outcome)

    def zero_control_series(self, pipeline: str, stages: list[str]) -> None:
        """The same for the re-optimization controller's series of the stages it may optimize."""
        for stage in stages:
            for decision in ("start", "advance", "promote", "rollback", "resume"):
                self.rollout_decisions.labels(pipeline, stage, decision)
            for outcome in ("started", "registered", "no_gain", "failed"):
                self.optimizer_jobs.labels(pipeline, stage, outcome)
            for outcome in ("accepted", "needs_review", "skipped"):
                self.optimizer_candidates.labels(pipeline, stage, outcome)
            self.canary_weight.labels(pipeline, stage).set(0)


def local_samples(metrics_dir: str, pipeline: str):
    """Every sample of one pipeline in a folder of prometheus_client multiprocess files (this node's replicas),
    as /metrics would show them: what `replica_metrics` reads for the controller and the built-in dashboard page."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=metrics_dir)
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.labels.get("pipeline") == pipeline:
                yield sample


_default: Metrics | None = None


def default_metrics() -> Metrics:
    """The process-wide metrics (created once: prometheus_client refuses duplicate names)."""
    global _default
    if _default is None:
        _default = Metrics()
    return _default
