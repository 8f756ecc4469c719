"""The one reader of the replicas' metrics, for the controller and the built-in dashboard page.

A snapshot holds cumulative counters as /metrics shows them: per stage the latency histogram
(count, sum, buckets, calls per variant) and errors, the pipeline's end-to-end histogram and the
stages' speedup gauges. It comes from this node's prometheus_client multiprocess files (what every
replica writes) or, on a cluster, from a Prometheus server that scrapes every node. Windows are the
difference of two snapshots, as Prometheus' `rate` + `histogram_quantile` would compute them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from hetforge.config import prometheus_url
from hetforge.serving.metrics import local_samples

PIPELINE_LATENCY = "hetforge_pipeline_request_latency_seconds"
STAGE_LATENCY = "hetforge_stage_latency_seconds"
STAGE_ERRORS = "hetforge_stage_errors_total"
SPEEDUP = "hetforge_stage_speedup_ratio"


@dataclass
class StageCounters:
    """Cumulative numbers of one stage (all variants)."""

    count: float = 0.0
    sum_s: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)  # upper bound -> cumulative count
    errors: float = 0.0
    variant_calls: dict[str, float] = field(default_factory=dict)  # variant label -> calls


@dataclass
class MetricsSnapshot:
    """Cumulative numbers of one pipeline at one moment."""

    stages: dict[str, StageCounters] = field(default_factory=dict)
    pipeline_buckets: dict[float, float] = field(default_factory=dict)
    pipeline_count: float = 0.0
    speedup: dict[str, float] = field(default_factory=dict)  # stage -> the active variant's speedup (max over devices)

    def stage(self, name: str) -> StageCounters:
        return self.stages.setdefault(name, StageCounters())


def read_local(metrics_dir: str, pipeline: str) -> MetricsSnapshot:
    """The pipeline's counters from the prometheus_client multiprocess files of this node."""
    snap = MetricsSnapshot()
    for s in local_samples(metrics_dir, pipeline):
        labels = s.labels
        if s.name == PIPELINE_LATENCY + "_bucket":
            le = float(labels["le"])
            snap.pipeline_buckets[le] = snap.pipeline_buckets.get(le, 0.0) + s.value
        elif s.name == PIPELINE_LATENCY + "_count":
            snap.pipeline_count += s.value
        elif "stage" not in labels:
            continue
        elif s.name == STAGE_LATENCY + "_count":
            c = snap.stage(labels["stage"])
            c.count += s.value
            c.variant_calls[labels["variant"]] = c.variant_calls.get(labels["variant"], 0.0) + s.value
        elif s.name == STAGE_LATENCY + "_sum":
            snap.stage(labels["stage"]).sum_s += s.value
        elif s.name == STAGE_LATENCY + "_bucket":
            c, le = snap.stage(labels["stage"]), float(labels["le"])
            c.buckets[le] = c.buckets.get(le, 0.0) + s.value
        elif s.name == STAGE_ERRORS:
            snap.stage(labels["stage"]).errors += s.value
        elif s.name == SPEEDUP:
            snap.speedup[labels["stage"]] = max(snap.speedup.get(labels["stage"], 0.0), s.value)
    return snap


def read_prometheus(url: str, pipeline: str, timeout_s: float = 10.0) -> MetricsSnapshot:
    """The stage counters summed over every scraped node, through Prometheus' HTTP API (instant queries)."""

    def query(expr: str) -> list[dict]:
        reply = httpx.get(f"{url.rstrip('/')}/api/v1/query", params={"query": expr}, timeout=timeout_s).json()
        if reply.get("status") != "success":
            raise RuntimeError(f"Prometheus at {url}: {reply.get('error', reply)}")
        return reply["data"]["result"]

    selector = '{pipeline="' + pipeline.replace('"', "") + '"}'
    snap = MetricsSnapshot()
    for r in query(f"sum by (stage, le) ({STAGE_LATENCY}_bucket{selector})"):
        snap.stage(r["metric"]["stage"]).buckets[float(r["metric"]["le"])] = float(r["value"][1])
    for suffix, attr in (("_count", "count"), ("_sum", "sum_s")):
        for r in query(f"sum by (stage) ({STAGE_LATENCY}{suffix}{selector})"):
            setattr(snap.stage(r["metric"]["stage"]), attr, float(r["value"][1]))
    for r in query(f"sum by (stage) ({STAGE_ERRORS}{selector})"):
        snap.stage(r["metric"]["stage"]).errors = float(r["value"][1])
    return snap


def stage_counters_source(metrics_dir: str, pipeline: str) -> Callable[[], dict[str, StageCounters]]:
    """Where the controller reads stage counters: Prometheus when HETFORGE_PROMETHEUS_URL is set (every node of a
    cluster), else this node's multiprocess files (the embedded default)."""
    url = prometheus_url()
    if url:
        return lambda: read_prometheus(url, pipeline).stages
    return lambda: read_local(metrics_dir, pipeline).stages


@dataclass(frozen=True)
class StageWindow:
    """One stage over the window."""

    calls: float
    mean_ms: float
    p50_ms: float | None
    errors: float


def window_of(new: StageCounters, old: StageCounters | None) -> StageWindow:
    """The difference of two snapshots (a restarted replica's counters start again: then the new ones alone)."""
    if old is None or new.count < old.count:
        old = StageCounters()
    calls = new.count - old.count
    mean = (new.sum_s - old.sum_s) / calls * 1e3 if calls > 0 else 0.0
    return StageWindow(
        calls, mean, bucket_quantile(bucket_diff(new.buckets, old.buckets), 0.5), max(0.0, new.errors - old.errors)
    )


def bucket_diff(new: dict[float, float], old: dict[float, float]) -> dict[float, float]:
    return {le: new[le] - old.get(le, 0.0) for le in new}


def bucket_quantile(buckets: dict[float, float], q: float) -> float | None:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket holding the rank, in ms."""
    if not buckets:
        return None
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for le in bounds:
        if buckets[le] >= rank:
            if math.isinf(le):
                return lower * 1e3
            inside = buckets[le] - below
            frac = (rank - below) / inside if inside > 0 else 1.0
            return (lower + (le - lower) * frac) * 1e3
        lower, below = le, buckets[le]
    return lower * 1e3
