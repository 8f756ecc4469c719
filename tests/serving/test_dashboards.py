"""The Grafana dashboard generator and the built-in page's parts, without a deployment (the live checks of
every query against Prometheus and of the page in Chromium are in test_reoptimize_e2e.py)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO

pytest.importorskip("prometheus_client")

from hetforge.serving import dashboards  # noqa: E402
from hetforge.serving.metrics import CONTROL_SPEC, SPEC  # noqa: E402


def test_committed_dashboards_are_the_generators_output():
    for rel, text in dashboards.files().items():
        path = REPO / "dashboards" / rel
        assert path.is_file(), f"{path} missing: run `hetforge dashboards --out dashboards`"
        assert path.read_text() == text, (
            f"{path} differs from the generator: run `hetforge dashboards --out dashboards`"
        )
    configmap = REPO / "deploy" / "kubernetes" / "dashboards-configmap.yaml"
    assert configmap.read_text() == dashboards.configmap(), (
        "run `hetforge dashboards --configmap deploy/kubernetes/dashboards-configmap.yaml`"
    )


def test_dashboard_covers_what_operators_watch_with_known_metrics():
    doc = dashboards.dashboard()
    titles = [p["title"] for p in doc["panels"] if p["type"] != "row"]
    for wanted in (
        "End-to-end latency against the SLO",
        "Stage latency p50 by variant and device",
        "Speedup of the active variant over the reference",
        "Requests and errors",
        "Optimization jobs",
        "Candidates judged, by outcome",
        "Last job's winner over eager and torch.compile",
        "Placement",
        "Canary weight",
    ):
        assert wanted in titles
    assert {a["name"] for a in doc["annotations"]["list"] if "expr" in a} == {"Swaps", "Canary steps", "Rollbacks"}
    assert [v["name"] for v in doc["templating"]["list"]] == ["datasource", "pipeline", "stage"]
    used = set()
    for where, expr in dashboards.queries(doc):
        names = dashboards.metric_names(expr)
        assert names and all(dashboards.known_metric(n) for n in names), (where, expr)
        used |= names
    assert used == set(SPEC) | set(CONTROL_SPEC)  # every exported metric is on the dashboard
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for p in doc["panels"]:  # panels fit the 24-column grid and do not overlap
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
    cells = set()
    for p in doc["panels"]:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, p["title"]
                cells.add((x, y))


def test_llm_dashboard_shows_every_llm_engine_metric():
    from hetforge.serving.llm_metrics import LLM_SPEC

    doc = dashboards.llm_dashboard()
    titles = {p["title"] for p in doc["panels"] if p["type"] != "row"}
    assert {"Prefix-cache hit rate", "Time to first token", "Time per output token", "Queue time"} <= titles
    used = set()
    for where, expr in dashboards.queries(doc):
        names = dashboards.metric_names(expr)
        assert names and all(n in LLM_SPEC for n in names), (where, expr)
        used |= names
    assert used == set(LLM_SPEC)
    assert doc["uid"] != dashboards.dashboard()["uid"]


def test_metric_names_reads_histograms_as_their_family():
    expr = 'histogram_quantile(0.5, sum by (le) (rate(hetforge_stage_latency_seconds_bucket{pipeline="p"}[1m])))'
    assert dashboards.metric_names(expr) == {"hetforge_stage_latency_seconds"}
    assert not dashboards.known_metric("hetforge_made_up_total")
    assert (
        dashboards.substitute('x{pipeline="$pipeline"}[$__rate_interval]', {"pipeline": "p"}) == 'x{pipeline="p"}[30s]'
    )


def test_provisioning_points_grafana_at_the_dashboard_and_the_datasource_uid():
    import yaml

    ds = yaml.safe_load(dashboards.datasource_provisioning())["datasources"][0]
    assert ds["uid"] == dashboards.DATASOURCE_UID and ds["type"] == "prometheus"
    provider = yaml.safe_load(dashboards.dashboard_provisioning())["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"]
    cm = yaml.safe_load(dashboards.configmap())
    assert json.loads(cm["data"]["hetforge.json"]) == dashboards.dashboard()
    assert json.loads(cm["data"]["hetforge-llm.json"]) == dashboards.llm_dashboard()


def test_sampler_turns_counter_differences_into_window_quantiles(tmp_path, monkeypatch):
    """Two replicas' multiprocess files, then more calls: the window holds only the new calls."""
    from hetforge.serving.dashboard_page import DashboardSampler, point_between
    from hetforge.serving.replica_metrics import MetricsSnapshot, StageCounters

    old = MetricsSnapshot(
        pipeline_buckets={0.01: 10, 0.1: 10, float("inf"): 10},
        pipeline_count=10,
        stages={"s": StageCounters(buckets={0.01: 10, float("inf"): 10}, variant_calls={"reference": 10})},
    )
    new = MetricsSnapshot(
        pipeline_buckets={0.01: 10, 0.1: 30, float("inf"): 30},
        pipeline_count=30,
        stages={
            "s": StageCounters(
                buckets={0.01: 10, 0.1: 30, float("inf"): 30}, variant_calls={"reference": 12, "variant:3": 18}
            )
        },
        speedup={"s": 2.0},
    )
    p = point_between(new, old, 100.0, 10.0)
    assert 10 < p.e2e_p50_ms < 100 and p.rps == 2.0  # the 20 new requests all took 10-100 ms
    assert p.serving == {"s": "variant:3"} and p.speedup == {"s": 2.0}
    restarted = point_between(
        MetricsSnapshot(pipeline_buckets={0.01: 5, float("inf"): 5}, pipeline_count=5), old, 100.0, 10.0
    )
    assert restarted.rps == 0.5 and restarted.e2e_p50_ms <= 10  # counters went down: a restart, the new ones alone
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    sampler = DashboardSampler("p", str(tmp_path))
    assert sampler.sample(now=1.0) is None and sampler.sample(now=3.0).rps == 0.0


def test_page_renders_plots_and_tables_from_data():
    from hetforge.serving.dashboard_page import SLO_LINE, SPEEDUP_BAR, render

    series = [
        {
            "t": 1000.0 + 2 * i,
            "e2e_p50_ms": 50.0 - i,
            "e2e_p99_ms": 90.0,
            "rps": 3.0,
            "stage_p50_ms": {"enc": 30.0 - i},
            "speedup": {"enc": 1.0 if i < 5 else 2.1},
            "serving": {"enc": "variant:4"},
        }
        for i in range(10)
    ]
    data = {
        "pipeline": "demo",
        "generated_at": 1020.0,
        "slo_p99_ms": 120.0,
        "series": series,
        "latest": series[-1],
        "placement": [{"stage": "enc", "kind": "model", "device_class": "cpu", "device": "cpu"}],
        "swaps": [
            {
                "id": 1,
                "stage": "enc",
                "variant": "4",
                "requested_by": "controller",
                "at": 1010.0,
                "reports": [{"outcome": "swapped"}],
            }
        ],
        "rollout_events": [
            {"at": 1011.0, "stage": "enc", "decision": "promote", "variant": "4", "reason": "faster <b>"}
        ],
        "pending_approvals": [],
        "reoptimize": None,
        "sampler_error": "",
    }
    page = render(data)
    assert page.count("<svg") == 4 and SPEEDUP_BAR in page and SLO_LINE in page
    assert "2.10x" in page and "variant:4" in page and "promote" in page and "faster &lt;b&gt;" in page  # escaped
    assert "nothing waits for approval" in page
    empty = render({**data, "series": [], "latest": None})
    assert "no data yet" in empty and "no requests in the last window" in empty


def test_cli_writes_the_dashboards_and_the_configmap(tmp_path):
    from tests.conftest import run_cli

    result = run_cli("dashboards", "--out", str(tmp_path / "out"), "--configmap", str(tmp_path / "cm.yaml"))
    assert result.returncode == 0, result.stderr
    for rel in dashboards.files():
        assert (tmp_path / "out" / rel).read_text() == (REPO / "dashboards" / rel).read_text()
    assert (tmp_path / "cm.yaml").read_text() == (
        REPO / "deploy" / "kubernetes" / "dashboards-configmap.yaml"
    ).read_text()
