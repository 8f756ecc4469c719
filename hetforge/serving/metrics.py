"""The metrics contract: names, help texts and labels that the dashboards query.

Names follow `hetforge_<what>_<unit>`; labels are few and bounded (pipeline, stage, variant,
device, outcome). `tests/serving/test_metrics.py` pins them: renaming one breaks the dashboards.
Each process records its own; under Ray Serve the replicas write prometheus_client's multiprocess
files into one folder (`PROMETHEUS_MULTIPROC_DIR`) and the ingress's /metrics aggregates them.
The speedup gauge has no variant label: one series per stage and device, whatever is active
(a stale per-variant series cannot be removed from multiprocess files).
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

SPEC = {  # name -> (kind, help, labels)
    "hetforge_pipeline_request_latency_seconds": ("histogram", "End-to-end latency of one pipeline request.", ("pipeline",)),
    "hetforge_stage_latency_seconds": ("histogram", "Latency of one stage call.", ("pipeline", "stage", "variant", "device")),
    "hetforge_pipeline_requests_total": ("counter", "Pipeline requests, by outcome (ok | error).", ("pipeline", "outcome")),
    "hetforge_stage_errors_total": ("counter", "Stage calls that raised.", ("pipeline", "stage")),
    "hetforge_stage_speedup_ratio": ("gauge", "Active variant's verified speedup over the stage's reference (1 for the reference).",
                                     ("pipeline", "stage", "device")),
    "hetforge_kernel_swaps_total": ("counter", "Kernel hot-swaps, by outcome (swapped | refused | rolled_back).", ("stage", "outcome")),
}
# Written by the re-optimization controller (only pipelines with a `reoptimize:` block have these series).
CONTROL_SPEC = {
    "hetforge_rollout_decisions_total": ("counter", "Rollout decisions (start | advance | promote | rollback | resume).",
                                         ("stage", "decision")),
    "hetforge_canary_weight_percent": ("gauge", "Percent of a stage's calls its variant under rollout serves (0: none; shadow: 0).",
                                       ("pipeline", "stage")),
    "hetforge_optimizer_jobs_total": ("counter", "Background optimization jobs, by outcome (started | registered | no_gain | failed).",
                                      ("pipeline", "stage", "outcome")),
    "hetforge_optimizer_candidates_total": ("counter", "Candidates judged by background jobs: accepted, needs_review, skipped, "
                                            "or rejected:<reason kind>.", ("pipeline", "stage", "outcome")),
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
        self.rollout_decisions = made["hetforge_rollout_decisions_total"]
        self.canary_weight = made["hetforge_canary_weight_percent"]
        self.optimizer_jobs = made["hetforge_optimizer_jobs_total"]
        self.optimizer_candidates = made["hetforge_optimizer_candidates_total"]
        self.registry = registry


_default: Metrics | None = None


def default_metrics() -> Metrics:
    """The process-wide metrics (created once: prometheus_client refuses duplicate names)."""
    global _default
    if _default is None:
        _default = Metrics()
    return _default
