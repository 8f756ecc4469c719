"""vLLM's own engine statistics as hetforge metrics, labelled by pipeline, stage and replica.

vLLM hands every engine step's `SchedulerStats` and `IterationStats` to its stat loggers (the
`StatLoggerBase` interface, `vllm/v1/metrics/loggers.py`); `HetforgeStatLogger` is one, passed to
`AsyncLLM.from_engine_args(stat_loggers=...)`. It records what vLLM's Prometheus logger records
for the same figures (`vllm:prefix_cache_queries`/`hits`, `vllm:time_to_first_token_seconds`,
`vllm:request_time_per_output_token_seconds`, `vllm:request_queue_time_seconds`), under hetforge's
names and labels, into the replica's prometheus_client multiprocess files like every hetforge metric.
vLLM's own Prometheus logger stays off (`disable_log_stats`): its `vllm:*` series carry no stage.

The prefix-cache hit rate is rate(hits) / rate(queries), both in prompt tokens.

`measurement_of` turns a stage's exported figures into the planner's `LlmMeasurement` (means per call; vLLM's
TTFT counts from arrival, so the queue time is taken out of it and kept as its own term).
"""

from __future__ import annotations

import time

from prometheus_client import REGISTRY, Counter, Histogram

from hetforge.planners.profiles import LlmMeasurement

TOKEN_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)
REQUEST_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0)
LABELS = ("pipeline", "stage", "replica")

LLM_SPEC = {  # name -> (kind, help, labels); pinned by tests/serving/test_openai_unit.py
    "hetforge_llm_prefix_cache_queries_tokens_total": (
        "counter",
        "Prompt tokens looked up in vLLM's prefix cache.",
        LABELS,
    ),
    "hetforge_llm_prefix_cache_hits_tokens_total": (
        "counter",
        "Prompt tokens found in vLLM's prefix cache (not prefilled again).",
        LABELS,
    ),
    "hetforge_llm_prompt_tokens_total": ("counter", "Prompt tokens prefilled (cache hits excluded).", LABELS),
    "hetforge_llm_generation_tokens_total": ("counter", "Tokens generated.", LABELS),
    "hetforge_llm_time_to_first_token_seconds": (
        "histogram",
        "Time from a generation's arrival in the engine to its first token.",
        LABELS,
    ),
    "hetforge_llm_time_per_output_token_seconds": (
        "histogram",
        "A finished generation's mean time per output token after the first.",
        LABELS,
    ),
    "hetforge_llm_queue_time_seconds": (
        "histogram",
        "Time a generation waited in the engine's queue before it was scheduled.",
        LABELS,
    ),
}


class LlmMetrics:
    """The LLM engine metrics on the process-default registry (created once per process)."""

    def __init__(self, registry=REGISTRY):
        made = {}
        for name, (kind, help_text, labels) in LLM_SPEC.items():
            if kind == "counter":
                made[name] = Counter(name.removesuffix("_total"), help_text, labels, registry=registry)
            else:
                buckets = TOKEN_LATENCY_BUCKETS_S if "per_output" in name else REQUEST_LATENCY_BUCKETS_S
                made[name] = Histogram(name, help_text, labels, buckets=buckets, registry=registry)
        self.cache_queries = made["hetforge_llm_prefix_cache_queries_tokens_total"]
        self.cache_hits = made["hetforge_llm_prefix_cache_hits_tokens_total"]
        self.prompt_tokens = made["hetforge_llm_prompt_tokens_total"]
        self.generation_tokens = made["hetforge_llm_generation_tokens_total"]
        self.ttft = made["hetforge_llm_time_to_first_token_seconds"]
        self.tpot = made["hetforge_llm_time_per_output_token_seconds"]
        self.queue_time = made["hetforge_llm_queue_time_seconds"]

    def record(self, labels: tuple[str, str, str], scheduler_stats, iteration_stats) -> None:
        """One engine step's statistics (either may be None: vLLM sends what the step produced)."""
        if scheduler_stats is not None:
            cache = scheduler_stats.prefix_cache_stats
            self.cache_queries.labels(*labels).inc(cache.queries)
            self.cache_hits.labels(*labels).inc(cache.hits)
        if iteration_stats is not None:
            self.prompt_tokens.labels(*labels).inc(iteration_stats.prompt_token_stats.computed)
            self.generation_tokens.labels(*labels).inc(iteration_stats.num_generation_tokens)
            for ttft in iteration_stats.time_to_first_tokens_iter:
                self.ttft.labels(*labels).observe(ttft)
            for done in iteration_stats.finished_requests:
                self.queue_time.labels(*labels).observe(done.queued_time)
                if done.num_generation_tokens > 1:
                    self.tpot.labels(*labels).observe(done.mean_time_per_output_token)


_metrics: LlmMetrics | None = None


def llm_metrics() -> LlmMetrics:
    """The process-wide LLM metrics (prometheus_client refuses duplicate names)."""
    global _metrics
    if _metrics is None:
        _metrics = LlmMetrics()
    return _metrics


def stat_logger_factory(pipeline: str, stage: str, replica: str = ""):
    """A vLLM `StatLoggerFactory` (called with the engine's config and index) recording into `llm_metrics()`."""
    from vllm.v1.metrics.loggers import StatLoggerBase  # only LLM replicas import vLLM

    class HetforgeStatLogger(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            self.labels = (pipeline, stage, replica)
            self.metrics = llm_metrics()
            for child in (self.metrics.cache_queries, self.metrics.cache_hits):
                child.labels(*self.labels)  # series at 0 from the start: rate() sees the first hits

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            self.metrics.record(self.labels, scheduler_stats, iteration_stats)

        def log_engine_initialized(self):
            pass

    return HetforgeStatLogger


def measurement_of(samples, stage: str) -> LlmMeasurement | None:
    """The stage's mean figures per call from its replicas' samples (`metrics.local_samples`); None before a call."""
    total: dict[str, float] = {}
    for sample in samples:
        if sample.labels.get("stage") == stage and sample.name.startswith("hetforge_llm_"):
            total[sample.name] = total.get(sample.name, 0.0) + sample.value
    calls = total.get("hetforge_llm_time_to_first_token_seconds_count", 0.0)
    if calls <= 0:
        return None

    def mean_ms(name: str) -> float:
        count = total.get(name + "_count", 0.0)
        return 1e3 * total.get(name + "_sum", 0.0) / count if count else 0.0

    queue = mean_ms("hetforge_llm_queue_time_seconds")
    return LlmMeasurement(
        ttft_ms=round(max(0.0, mean_ms("hetforge_llm_time_to_first_token_seconds") - queue), 4),
        tpot_ms=round(mean_ms("hetforge_llm_time_per_output_token_seconds"), 4),
        queue_ms=round(queue, 4),
        prompt_tokens=round(total.get("hetforge_llm_prefix_cache_queries_tokens_total", 0.0) / calls, 2),
        output_tokens=round(total.get("hetforge_llm_generation_tokens_total", 0.0) / calls, 2),
        requests=int(calls),
        source=f"metrics of the replicas over {int(calls)} calls",
        at=time.time(),
    )
