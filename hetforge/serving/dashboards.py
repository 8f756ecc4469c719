"""Grafana dashboards of a hetforge deployment, generated from typed code.

`hetforge dashboards --out dashboards/` writes `dashboards/hetforge.json` (the pipeline dashboard),
`dashboards/hetforge-llm.json` (the LLM stages' vLLM engine figures: `llm_metrics.LLM_SPEC`) and the
provisioning files Grafana reads at start: a Prometheus datasource and a file provider for the
dashboard folder. `deploy/` mounts them (compose) or ships them as a ConfigMap (Kubernetes).

Every query uses only the metric names and labels of `hetforge.serving.metrics` (SPEC and
CONTROL_SPEC), and `tests/serving/test_reoptimize_e2e.py` runs each of them, annotations and
template variables included, against a real Prometheus scraping a live deployment: a panel whose
query returns nothing fails that test. The committed files must equal this generator's output
(`tests/serving/test_dashboards.py`).

Plain dataclasses rather than a dashboard library: the model needed is eight fields, the JSON is
Grafana's documented dashboard schema, and a generator that is one file of code is easier to
review than a dependency (grafanalib is unmaintained since Weaveworks closed; Grafana's
foundation SDK is a large generated package).

Over 450 lines: most of it is the panel list, one declaration per panel; the Grafana JSON is
generated from it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from hetforge.serving.llm_metrics import LLM_SPEC
from hetforge.serving.metrics import CONTROL_SPEC, SPEC

UID = "hetforge-pipeline"
LLM_UID = "hetforge-llm"
DATASOURCE_UID = "prometheus"
DS = {"type": "prometheus", "uid": "${datasource}"}
PIPE = 'pipeline="$pipeline"'
STAGES = 'pipeline="$pipeline", stage=~"$stage"'


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""
    instant: bool = False  # table and stat panels show the latest value
    table: bool = False


@dataclass(frozen=True)
class Panel:
    title: str
    kind: str  # timeseries | stat | table | bargauge
    queries: tuple[Query, ...]
    description: str
    unit: str = "short"
    width: int = 12
    height: int = 8
    overrides: tuple[dict, ...] = ()
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Annotation:
    name: str
    expr: str
    color: str
    title: str
    tags: str  # comma-separated label names shown as tags


def _quantile(q: float, metric: str, selector: str, by: str = "") -> str:
    by = f"le, {by}" if by else "le"
    return f"histogram_quantile({q}, sum by ({by}) (rate({metric}_bucket{{{selector}}}[$__rate_interval])))"


ROWS: tuple[tuple[str, tuple[Panel, ...]], ...] = (
    (
        "Pipeline",
        (
            Panel(
                "End-to-end latency against the SLO",
                "timeseries",
                (
                    Query(_quantile(0.5, "hetforge_pipeline_request_latency_seconds", PIPE), "p50"),
                    Query(_quantile(0.99, "hetforge_pipeline_request_latency_seconds", PIPE), "p99"),
                    Query(f'max(hetforge_pipeline_slo_seconds{{{PIPE}, quantile="0.99"}})', "SLO (p99 target)"),
                ),
                "Request latency through the ingress, from the pipeline's histogram; the dashed line is the spec's slo.p99_ms.",
                unit="s",
                overrides=(
                    {
                        "matcher": {"id": "byName", "options": "SLO (p99 target)"},
                        "properties": [
                            {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
                            {"id": "color", "value": {"mode": "fixed", "fixedColor": "red"}},
                        ],
                    },
                ),
            ),
            Panel(
                "Requests and errors",
                "timeseries",
                (
                    Query(
                        f"sum by (outcome) (rate(hetforge_pipeline_requests_total{{{PIPE}}}[$__rate_interval]))",
                        "requests {{outcome}}",
                    ),
                    Query(
                        f"sum by (stage) (rate(hetforge_stage_errors_total{{{STAGES}}}[$__rate_interval]))",
                        "errors in {{stage}}",
                    ),
                ),
                "Pipeline requests per second by outcome, and stage calls that raised.",
                unit="reqps",
            ),
        ),
    ),
    (
        "Stages",
        (
            Panel(
                "Stage latency p50 by variant and device",
                "timeseries",
                (
                    Query(
                        _quantile(0.5, "hetforge_stage_latency_seconds", STAGES, "stage, variant, device"),
                        "{{stage}} {{variant}} on {{device}}",
                    ),
                ),
                "Median latency of one stage call (a batch for model stages), split by the variant that served it.",
                unit="s",
            ),
            Panel(
                "Stage latency p99 by variant and device",
                "timeseries",
                (
                    Query(
                        _quantile(0.99, "hetforge_stage_latency_seconds", STAGES, "stage, variant, device"),
                        "{{stage}} {{variant}} on {{device}}",
                    ),
                ),
                "Tail latency of one stage call, by variant: a canary's tail shows here before it is promoted.",
                unit="s",
            ),
            Panel(
                "Speedup of the active variant over the reference",
                "timeseries",
                (
                    Query(
                        f"max by (stage, device) (hetforge_stage_speedup_ratio{{{STAGES}}})", "{{stage}} on {{device}}"
                    ),
                ),
                "The verified speedup of whatever each stage serves (1 = its reference); steps at swaps and promotions.",
                unit="x",
            ),
            Panel(
                "Speedup now",
                "stat",
                (Query(f"max by (stage) (hetforge_stage_speedup_ratio{{{STAGES}}})", "{{stage}}", instant=True),),
                "The active variant's verified speedup per stage.",
                unit="x",
                width=6,
                options={"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "value", "graphMode": "none"},
            ),
            Panel(
                "Placement",
                "table",
                (
                    Query(
                        f"max by (stage, kind, device_class, device) (hetforge_stage_placement_info{{{PIPE}}})",
                        instant=True,
                        table=True,
                    ),
                ),
                "Where the planner placed each stage: device class (cpu or a GPU model) and device.",
                width=6,
            ),
        ),
    ),
    (
        "Swaps, canaries and the optimizer",
        (
            Panel(
                "Canary weight",
                "timeseries",
                (Query(f"max by (stage) (hetforge_canary_weight_percent{{{STAGES}}})", "{{stage}}"),),
                "Percent of a stage's calls that the variant under rollout serves (0 during a shadow step and between rollouts).",
                unit="percent",
            ),
            Panel(
                "Swaps and rollout decisions",
                "timeseries",
                (
                    Query(
                        f"sum by (stage, outcome) (increase(hetforge_kernel_swaps_total{{{STAGES}}}[$__rate_interval]))",
                        "swap {{stage}} {{outcome}}",
                    ),
                    Query(
                        f"sum by (stage, decision) (increase(hetforge_rollout_decisions_total{{{STAGES}}}[$__rate_interval]))",
                        "rollout {{stage}} {{decision}}",
                    ),
                ),
                "Hot-swaps by outcome and the controller's rollout decisions.",
            ),
            Panel(
                "Optimization jobs",
                "bargauge",
                (Query(f"sum by (outcome) (hetforge_optimizer_jobs_total{{{STAGES}}})", "{{outcome}}", instant=True),),
                "Background jobs since the deployment started: started, registered (a winner went to canary or review), no_gain, failed.",
                width=12,
                options={"displayMode": "basic", "orientation": "horizontal"},
            ),
            Panel(
                "Last job's winner over eager and torch.compile",
                "bargauge",
                (
                    Query(
                        f"max by (stage, baseline) (hetforge_optimizer_speedup_ratio{{{STAGES}}})",
                        "{{stage}} vs {{baseline}}",
                        instant=True,
                    ),
                ),
                "The last job's winner as the judge timed it, over eager and over torch.compile, both at the stage's "
                "precision policy (compile: the recipe named compile_baseline in the job's summary).",
                width=12,
                options={"displayMode": "basic", "orientation": "horizontal"},
            ),
            Panel(
                "Candidates judged, by outcome",
                "bargauge",
                (
                    Query(
                        f"sum by (outcome) (hetforge_optimizer_candidates_total{{{STAGES}}})",
                        "{{outcome}}",
                        instant=True,
                    ),
                ),
                "Every candidate the jobs' verifiers judged: accepted, needs_review, skipped, or rejected with its reason kind.",
                width=12,
                options={"displayMode": "basic", "orientation": "horizontal"},
            ),
        ),
    ),
)

ANNOTATIONS = (
    Annotation(
        "Swaps",
        f"sum by (stage, outcome) (increase(hetforge_kernel_swaps_total{{{PIPE}}}[$__interval])) > 0",
        "blue",
        "swap {{stage}}: {{outcome}}",
        "stage,outcome",
    ),
    Annotation(
        "Canary steps",
        f'sum by (stage, decision) (increase(hetforge_rollout_decisions_total{{{PIPE}, decision!="rollback"}}'
        "[$__interval])) > 0",
        "yellow",
        "rollout {{stage}}: {{decision}}",
        "stage,decision",
    ),
    Annotation(
        "Rollbacks",
        f'sum by (stage) (increase(hetforge_rollout_decisions_total{{{PIPE}, decision="rollback"}}[$__interval])) > 0',
        "red",
        "rollback of {{stage}}",
        "stage",
    ),
)

VARIABLES = (  # (name, label, query); the datasource variable comes first
    ("pipeline", "Pipeline", "label_values(hetforge_pipeline_requests_total, pipeline)"),
    ("stage", "Stage", 'label_values(hetforge_stage_latency_seconds_count{pipeline="$pipeline"}, stage)'),
)


def _hit_rate(by: str) -> str:
    hits = f"sum by ({by}) (rate(hetforge_llm_prefix_cache_hits_tokens_total{{{STAGES}}}[$__rate_interval]))"
    return hits + " / " + hits.replace("hits_tokens", "queries_tokens")


# The LLM stages' engine figures (`llm_metrics.LLM_SPEC`, from vLLM's own statistics): their own dashboard, so
# that the pipeline dashboard's queries all have data for pipelines without an LLM on vLLM.
LLM_ROWS: tuple[tuple[str, tuple[Panel, ...]], ...] = (
    (
        "LLM stages (vLLM engine)",
        (
            Panel(
                "Prefix-cache hit rate",
                "timeseries",
                (Query(_hit_rate("stage"), "{{stage}}"),),
                "Share of prompt tokens found in vLLM's prefix cache (not prefilled again): an agent loop's later turns "
                "reuse the conversation so far.",
                unit="percentunit",
            ),
            Panel(
                "Prefix-cache hit rate by replica",
                "timeseries",
                (Query(_hit_rate("stage, replica"), "{{stage}} {{replica}}"),),
                "Per replica: with session routing a conversation's turns meet the replica that holds its prefix.",
                unit="percentunit",
            ),
            Panel(
                "Time to first token",
                "timeseries",
                (
                    Query(_quantile(0.5, "hetforge_llm_time_to_first_token_seconds", STAGES, "stage"), "{{stage}} p50"),
                    Query(
                        _quantile(0.99, "hetforge_llm_time_to_first_token_seconds", STAGES, "stage"), "{{stage}} p99"
                    ),
                ),
                "From a generation's arrival in the engine to its first token (queue and prefill).",
                unit="s",
            ),
            Panel(
                "Time per output token",
                "timeseries",
                (
                    Query(
                        _quantile(0.5, "hetforge_llm_time_per_output_token_seconds", STAGES, "stage"), "{{stage}} p50"
                    ),
                    Query(
                        _quantile(0.99, "hetforge_llm_time_per_output_token_seconds", STAGES, "stage"), "{{stage}} p99"
                    ),
                ),
                "A finished generation's mean time per token after the first (decode speed).",
                unit="s",
            ),
            Panel(
                "Queue time",
                "timeseries",
                (
                    Query(_quantile(0.5, "hetforge_llm_queue_time_seconds", STAGES, "stage"), "{{stage}} p50"),
                    Query(_quantile(0.99, "hetforge_llm_queue_time_seconds", STAGES, "stage"), "{{stage}} p99"),
                ),
                "Time a generation waited in the engine's queue before it was scheduled.",
                unit="s",
            ),
            Panel(
                "Tokens per second",
                "timeseries",
                (
                    Query(
                        f"sum by (stage) (rate(hetforge_llm_prompt_tokens_total{{{STAGES}}}[$__rate_interval]))",
                        "{{stage}} prefilled",
                    ),
                    Query(
                        f"sum by (stage) (rate(hetforge_llm_generation_tokens_total{{{STAGES}}}[$__rate_interval]))",
                        "{{stage}} generated",
                    ),
                ),
                "Prompt tokens prefilled (cache hits excluded) and tokens generated.",
                unit="short",
            ),
        ),
    ),
)
LLM_VARIABLES = (
    ("pipeline", "Pipeline", "label_values(hetforge_llm_prefix_cache_queries_tokens_total, pipeline)"),
    (
        "stage",
        "Stage",
        'label_values(hetforge_llm_prefix_cache_queries_tokens_total{pipeline="$pipeline"}, stage)',
    ),
)


def _panel_json(panel: Panel, pid: int, x: int, y: int) -> dict:
    targets = []
    for i, q in enumerate(panel.queries):
        target = {"datasource": DS, "expr": q.expr, "refId": chr(ord("A") + i), "legendFormat": q.legend or "__auto"}
        if q.instant:
            target |= {"instant": True, "range": False}
        if q.table:
            target["format"] = "table"
        targets.append(target)
    doc = {
        "id": pid,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DS,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "targets": targets,
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": list(panel.overrides)},
        "options": dict(panel.options),
    }
    if panel.kind == "timeseries":
        doc["fieldConfig"]["defaults"]["custom"] = {
            "drawStyle": "line",
            "lineWidth": 2,
            "showPoints": "never",
            "spanNulls": True,
        }
        doc["options"] = {
            "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
            "tooltip": {"mode": "multi"},
        } | doc["options"]
    if panel.kind == "table":
        doc["transformations"] = [{"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True}}}]
    return doc


def dashboard() -> dict:
    """The pipeline dashboard as Grafana's JSON model."""
    return _dashboard(
        UID,
        "hetforge: pipeline",
        "Per-stage latency and speedups, swaps, canaries and the optimizer of one hetforge pipeline.",
        ROWS,
        VARIABLES,
        ANNOTATIONS,
    )


def llm_dashboard() -> dict:
    """The LLM stages' dashboard: vLLM's prefix cache, time to first token, time per output token, queue time."""
    return _dashboard(
        LLM_UID,
        "hetforge: LLM stages",
        "vLLM engine figures of a pipeline's LLM stages, per stage and replica, from vLLM's own statistics.",
        LLM_ROWS,
        LLM_VARIABLES,
        (),
    )


def _dashboard(uid: str, title: str, description: str, rows, variable_specs, annotation_specs) -> dict:
    panels: list[dict] = []
    pid, y = 1, 0
    for row_title, row in rows:
        panels.append(
            {
                "id": pid,
                "type": "row",
                "title": row_title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        pid, y, x, height = pid + 1, y + 1, 0, 0
        for panel in row:
            if x + panel.width > 24:
                x, y, height = 0, y + height, 0
            panels.append(_panel_json(panel, pid, x, y))
            pid, x, height = pid + 1, x + panel.width, max(height, panel.height)
        y += height
    variables = [
        {
            "name": "datasource",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "current": {"text": "Prometheus", "value": DATASOURCE_UID},
            "hide": 0,
        }
    ]
    for name, label, query in variable_specs:
        variables.append(
            {
                "name": name,
                "label": label,
                "type": "query",
                "datasource": DS,
                "refresh": 2,
                "sort": 1,
                "query": {"query": query, "refId": f"{name}-values"},
                "definition": query,
                "multi": name == "stage",
                "includeAll": name == "stage",
                "allValue": ".*" if name == "stage" else None,
                "current": {"text": "All", "value": "$__all"} if name == "stage" else {},
            }
        )
    annotations = [
        {
            "builtIn": 1,
            "datasource": {"type": "grafana", "uid": "-- Grafana --"},
            "enable": True,
            "hide": True,
            "iconColor": "rgba(0, 211, 255, 1)",
            "name": "Annotations & Alerts",
            "type": "dashboard",
        }
    ]
    for a in annotation_specs:
        annotations.append(
            {
                "name": a.name,
                "datasource": DS,
                "enable": True,
                "iconColor": a.color,
                "expr": a.expr,
                "step": "$__interval",
                "titleFormat": a.title,
                "tagKeys": a.tags,
                "useValueForTime": False,
            }
        )
    return {
        "uid": uid,
        "title": title,
        "tags": ["hetforge"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "description": description,
        "templating": {"list": variables},
        "annotations": {"list": annotations},
        "panels": panels,
    }


def datasource_provisioning(url: str = "http://prometheus:9090") -> str:
    return (
        "# Grafana datasource provisioning (generated by `hetforge dashboards`).\napiVersion: 1\ndatasources:\n"
        f"  - name: Prometheus\n    uid: {DATASOURCE_UID}\n    type: prometheus\n    access: proxy\n    url: {url}\n"
        "    isDefault: true\n    jsonData: {timeInterval: 5s}\n"
    )


def dashboard_provisioning(folder: str = "/var/lib/grafana/dashboards/hetforge") -> str:
    return (
        "# Grafana dashboard provisioning (generated by `hetforge dashboards`).\napiVersion: 1\nproviders:\n"
        f"  - name: hetforge\n    folder: hetforge\n    type: file\n    allowUiUpdates: false\n    options:\n      path: {folder}\n"
    )


def files() -> dict[str, str]:
    """Relative path -> content of everything `hetforge dashboards` writes."""
    return {
        "hetforge.json": json.dumps(dashboard(), indent=2) + "\n",
        "hetforge-llm.json": json.dumps(llm_dashboard(), indent=2) + "\n",
        "provisioning/datasources/prometheus.yaml": datasource_provisioning(),
        "provisioning/dashboards/hetforge.yaml": dashboard_provisioning(),
    }


def configmap(name: str = "hetforge-dashboards", namespace: str = "hetforge") -> str:
    """The dashboard as a ConfigMap, labelled for Grafana's dashboard sidecar (kube-prometheus-stack's convention)."""
    data = ""
    for key in ("hetforge.json", "hetforge-llm.json"):
        body = "".join(f"    {line}\n" if line else "\n" for line in files()[key].splitlines())
        data += f"  {key}: |\n{body}"
    return (
        "# Generated by `hetforge dashboards --configmap`: the Grafana dashboards of hetforge.serving.dashboards.\n"
        f"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: {namespace}\n"
        '  labels:\n    grafana_dashboard: "1"\n    app.kubernetes.io/part-of: hetforge\n'
        f"data:\n{data}"
    )


def write(out: Path) -> list[Path]:
    written = []
    for rel, text in files().items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------------- checking
def queries(doc: dict) -> list[tuple[str, str]]:
    """(where, expr) of every PromQL expression in a dashboard: panels, annotations, variables."""
    out = []
    for panel in doc["panels"]:
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for a in doc["annotations"]["list"]:
        if "expr" in a:
            out.append((f"annotation {a['name']!r}", a["expr"]))
    for v in doc["templating"]["list"]:
        if v["type"] == "query":
            out.append((f"variable ${v['name']}", v["query"]["query"]))
    return out


def metric_names(expr: str) -> set[str]:
    """The hetforge metrics an expression reads (a histogram's _bucket/_count/_sum counted as the histogram)."""
    names = set()
    for token in re.findall(r"hetforge_[a-z0-9_]+", expr):
        for suffix in ("_bucket", "_count", "_sum"):
            if token.endswith(suffix) and known_metric(token.removesuffix(suffix)):
                token = token.removesuffix(suffix)
        names.add(token)
    return names


def known_metric(name: str) -> bool:
    """Whether a name the dashboards use is one hetforge exports."""
    return name in SPEC or name in CONTROL_SPEC or name in LLM_SPEC


def substitute(expr: str, variables: dict[str, str], interval: str = "15s", rate_interval: str = "30s") -> str:
    """The expression as Grafana would send it, with template variables replaced."""
    expr = expr.replace("$__rate_interval", rate_interval).replace("$__interval", interval)
    for name, value in variables.items():
        expr = expr.replace(f"${name}", value)
    return expr
