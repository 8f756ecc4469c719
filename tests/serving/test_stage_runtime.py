"""A model stage's runtime: registry variants built from checkpoint weights, hot-swap under load,
refusals with reasons, automatic rollback, and the metrics it exports."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest

from hetforge.core.problem import Problem
from hetforge.kernels.registry import Registry
from hetforge.optimizer.variants import VariantSpec
from hetforge.serving.metrics import CONTROL_SPEC, SPEC, Metrics
from hetforge.serving.stage_runtime import ModelStageRuntime, SwapRefused

PROBLEM = Path(__file__).resolve().parents[1] / "optimizer" / "problems" / "linear_relu.py"
ACCEPTED = {"verdict": "accepted", "needs_review": False, "speedup": 1.3, "reference_ms": 1.0, "candidate_ms": 0.77}

MODULE = """
import torch
import torch.nn as nn


class ModelNew(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x):
        {guard}
        return torch.relu(torch.addmm(self.lin.bias, x, self.lin.weight.t())).mul_({scale})
"""


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    torch.manual_seed(99)
    state = {"lin.weight": torch.randn(512, 256) * 0.05, "lin.bias": torch.randn(512)}
    torch.save(state, tmp_path / "weights.pt")
    FINGERPRINT[0] = Problem(file=str(PROBLEM), weights=str(tmp_path / "weights.pt")).load().fingerprint()
    return tmp_path / "weights.pt"


FINGERPRINT = [""]  # the stage's registry key: the problem file with this test's checkpoint (set by `checkpoint`)


@pytest.fixture
def registry(tmp_path) -> Registry:
    return Registry(tmp_path / "registry.sqlite")


def _add(
    registry: Registry, name: str, source: str = "", recipe: dict | None = None, verdict: dict = ACCEPTED, **kw
) -> int:
    args = dict(
        fingerprint=FINGERPRINT[0],
        device_class="cpu",
        precision="strict",
        name=name,
        agent="test",
        source=source or "# transform variant",
        verdict=verdict,
        recipe=recipe or {"kind": "module"},
    )
    args.update(kw)
    return registry.add(**args).id


def _runtime(registry, checkpoint, metrics=None, **kw) -> ModelStageRuntime:
    return ModelStageRuntime(
        "p",
        "embed",
        Problem(file=str(PROBLEM), weights=str(checkpoint)),
        registry=registry,
        metrics=metrics or Metrics(CollectorRegistry()),
        **kw,
    )


def test_reference_runs_with_checkpoint_weights(registry, checkpoint):
    rt = _runtime(registry, checkpoint)
    assert rt.active_variant == "reference"
    state = torch.load(checkpoint)
    x = torch.randn(4, 256)
    torch.testing.assert_close(rt(x), torch.relu(x @ state["lin.weight"].t() + state["lin.bias"]) * 2.0)


def test_registry_variant_is_built_from_the_loaded_instance_at_start(registry, checkpoint):
    spec = VariantSpec(rewrites=("fold_scale",), library=True)
    vid = _add(registry, "folded", recipe=spec.to_json())
    rt = _runtime(registry, checkpoint)
    assert rt.active_variant == f"variant:{vid}"
    x = torch.randn(8, 256)
    torch.testing.assert_close(rt(x), rt.reference(x), atol=1e-5, rtol=1e-5)  # checkpoint weights, folded


def test_refusals_name_the_reason_and_keep_serving(registry, checkpoint):
    metrics = Metrics(CollectorRegistry())
    rt = _runtime(registry, checkpoint, metrics)
    wrong = _add(registry, "wrong", MODULE.format(guard="pass", scale=3.0))
    pending = _add(
        registry, "flagged", MODULE.format(guard="pass", scale=2.0), verdict={**ACCEPTED, "needs_review": True}
    )
    other_device = _add(registry, "h100", MODULE.format(guard="pass", scale=2.0), device_class="H100")
    looser = _add(registry, "bf16", MODULE.format(guard="pass", scale=2.0), precision="bf16")
    renamed = _add(registry, "renamed", MODULE.format(guard="pass", scale=2.0).replace("self.lin", "self.proj"))
    live = [torch.randn(16, 256)]
    for vid, why in (
        (wrong, "disagrees"),
        (pending, "pending_review"),
        (other_device, "verified on H100"),
        (looser, "needs precision bf16"),
        (renamed, "cannot be built"),
        (424242, "no variant"),
    ):
        with pytest.raises(SwapRefused, match=why):
            rt.swap(vid, live)
        assert rt.active_variant == "reference"
    assert metrics.kernel_swaps.labels("p", "embed", "refused")._value.get() == 6
    assert rt(live[0]).shape == (16, 512)


def test_swaps_under_load_drop_nothing(registry, checkpoint):
    good = _add(registry, "addmm", MODULE.format(guard="pass", scale=2.0))
    rt = _runtime(registry, checkpoint, use_registry=False)
    xs = [torch.randn(3, 256) for _ in range(8)]
    want = [rt.reference(x) for x in xs]
    errors: list[BaseException] = []
    stop = threading.Event()

    def client():
        while not stop.is_set():
            for x, w in zip(xs, want, strict=True):
                try:
                    torch.testing.assert_close(rt(x), w, atol=1e-5, rtol=1e-5)
                except BaseException as err:  # noqa: BLE001 - collected for the assertion below
                    errors.append(err)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    for i in range(10):
        rt.swap(good if i % 2 == 0 else "reference", [xs[0]])
    stop.set()
    for t in threads:
        t.join()
    assert errors == []
    assert [r.outcome for r in rt.history] == ["swapped"] * 10


def test_variant_failing_on_live_traffic_is_rolled_back_and_the_request_served(registry, checkpoint):
    metrics = Metrics(CollectorRegistry())
    flaky = _add(
        registry,
        "flaky",
        MODULE.format(guard="if x.shape[0] == 7: raise RuntimeError('bad tile for 7 rows')", scale=2.0),
    )
    rt = _runtime(registry, checkpoint, metrics)
    assert rt.active_variant == f"variant:{flaky}"  # passed its check on the example inputs
    x = torch.randn(7, 256)
    torch.testing.assert_close(rt(x), rt.reference(x))  # served by the rolled-back-to reference
    assert rt.active_variant == "reference"
    assert rt.history[-1].outcome == "rolled_back" and "bad tile" in rt.history[-1].reason
    assert metrics.kernel_swaps.labels("p", "embed", "rolled_back")._value.get() == 1
    # the request was served: no failed call (the ingress counts those, hetforge_stage_errors_total by kind)
    assert all(sample.value == 0 for metric in metrics.stage_errors.collect() for sample in metric.samples)


def test_metric_names_and_labels_are_the_contract(registry, checkpoint):
    pinned = {
        "hetforge_pipeline_request_latency_seconds": ("pipeline",),
        "hetforge_stage_latency_seconds": ("pipeline", "stage", "variant", "device"),
        "hetforge_pipeline_requests_total": ("pipeline", "outcome"),
        "hetforge_stage_errors_total": ("pipeline", "stage", "kind"),
        "hetforge_stage_speedup_ratio": ("pipeline", "stage", "device"),
        "hetforge_kernel_swaps_total": ("pipeline", "stage", "outcome"),
        "hetforge_stage_placement_info": ("pipeline", "stage", "kind", "device_class", "device"),
        "hetforge_pipeline_slo_seconds": ("pipeline", "quantile"),
    }
    assert {name: spec[2] for name, spec in SPEC.items()} == pinned  # the dashboards query these
    assert {name: spec[2] for name, spec in CONTROL_SPEC.items()} == {
        "hetforge_rollout_decisions_total": ("pipeline", "stage", "decision"),
        "hetforge_canary_weight_percent": ("pipeline", "stage"),
        "hetforge_optimizer_jobs_total": ("pipeline", "stage", "outcome"),
        "hetforge_optimizer_candidates_total": ("pipeline", "stage", "outcome"),
        "hetforge_optimizer_speedup_ratio": ("pipeline", "stage", "baseline"),
    }
    metrics = Metrics(CollectorRegistry())
    vid = _add(registry, "addmm", MODULE.format(guard="pass", scale=2.0))
    rt = _runtime(registry, checkpoint, metrics)
    rt(torch.randn(2, 256))
    text = generate_latest(metrics.registry).decode()
    assert 'hetforge_stage_speedup_ratio{device="cpu",pipeline="p",stage="embed"} 1.3' in text
    assert (
        f'hetforge_stage_latency_seconds_count{{device="cpu",pipeline="p",stage="embed",variant="variant:{vid}"}} 1.0'
        in text
    )
    assert 'hetforge_kernel_swaps_total{outcome="swapped",pipeline="p",stage="embed"} 1.0' in text
    rt.swap("reference", [torch.randn(2, 256)])
    text = generate_latest(metrics.registry).decode()
    assert (
        'hetforge_stage_speedup_ratio{device="cpu",pipeline="p",stage="embed"} 1.0' in text
    )  # one series, now the reference's


def test_stage_config_swaps_every_replica_and_reports_refusals(tmp_path, checkpoint):
    """`ReplicaControl.apply` is what Serve's reconfigure runs on each replica: a newer swap request is checked on the
    replica's live inputs and reported; a refused one leaves the running variant serving; an old one is not re-run."""
    from hetforge.serving.replica_control import ReplicaControl
    from hetforge.serving.swap_control import SwapBoard

    path = tmp_path / "registry.sqlite"
    registry = Registry(path)
    good = _add(registry, "addmm", MODULE.format(guard="pass", scale=2.0))
    wrong = _add(registry, "wrong", MODULE.format(guard="pass", scale=3.0))
    board = SwapBoard(path)
    replicas = [_runtime(registry, checkpoint, use_registry=False) for _ in range(2)]
    controls = [ReplicaControl(rt, str(path), f"replica-{i}", report_s=3600) for i, rt in enumerate(replicas)]
    for rt in replicas:
        rt(torch.randn(5, 256))  # live traffic: the swap is checked on these inputs
    first = board.request("p", "embed", str(good))
    for c in controls:
        c.apply({"swap": {"id": first, "variant": str(good)}, "rollout": None})
        assert c.report_once()
    assert [r.outcome for r in board.reports(first)] == ["swapped", "swapped"]
    assert all(rt.active_variant == f"variant:{good}" for rt in replicas)
    second = board.request("p", "embed", str(wrong))
    for c in controls:
        c.apply({"swap": {"id": second, "variant": str(wrong)}, "rollout": None})
        c.report_once()
    refused = board.reports(second)
    assert [r.outcome for r in refused] == ["refused", "refused"] and "disagrees" in refused[0].reason
    assert all(rt.active_variant == f"variant:{good}" for rt in replicas)  # still serving the good one
    replicas[0].swap("reference", replicas[0].live_inputs())
    controls[0].apply({"swap": {"id": second, "variant": str(wrong)}, "rollout": None})  # the same config again
    assert replicas[0].active_variant == "reference"  # an applied request is not applied twice
    controls[0].apply({"swap": "not a request"})
    assert "swap" in controls[0].config_errors[-1] and replicas[0].active_variant == "reference"


def test_reports_wait_for_the_store_and_serving_does_not(tmp_path, checkpoint):
    """With the store gone, a replica still applies its config and serves; its report is written once the store is back."""
    from hetforge.serving.replica_control import ReplicaControl
    from hetforge.serving.swap_control import SwapBoard

    path = tmp_path / "state" / "registry.sqlite"
    path.parent.mkdir()
    registry = Registry(path)
    good = _add(registry, "addmm", MODULE.format(guard="pass", scale=2.0))
    rt = _runtime(registry, checkpoint, use_registry=False)
    rt(torch.randn(5, 256))
    control = ReplicaControl(rt, str(path), "replica-0", report_s=3600)
    board = SwapBoard(path)
    swap_to_good = board.request("p", "embed", str(good))
    control.apply({"swap": {"id": swap_to_good, "variant": str(good)}})
    back = board.request("p", "embed", "reference")
    aside = tmp_path / "aside"
    path.parent.rename(aside)  # the store is unreachable: every statement fails
    try:
        control.apply({"swap": {"id": back, "variant": "reference"}})
        assert rt.active_variant == "reference" and rt(torch.randn(3, 256)).shape == (3, 512)
        assert control.report_once() is False and control.status()["reports_pending"] == 2
    finally:
        aside.rename(path.parent)
    assert control.report_once() is True and control.status()["reports_pending"] == 0
    assert [r.outcome for r in board.reports(swap_to_good)] == ["swapped"]
    assert [r.outcome for r in board.reports(back)] == ["swapped"]


def test_a_swap_that_needs_the_unreachable_store_waits_for_it_and_the_replica_serves_on(tmp_path, checkpoint):
    """A swap to a registry variant reads its record: with the store gone, `apply` (Serve's reconfigure) must not
    fail the replica; the config is applied once the store answers again."""
    from hetforge.serving.replica_control import ReplicaControl
    from hetforge.serving.swap_control import SwapBoard

    path = tmp_path / "state" / "registry.sqlite"
    path.parent.mkdir()
    registry = Registry(path)
    good = _add(registry, "addmm", MODULE.format(guard="pass", scale=2.0))
    rt = _runtime(Registry(path), checkpoint, use_registry=False)
    rt(torch.randn(5, 256))
    control = ReplicaControl(rt, str(path), "replica-0", report_s=3600)
    request = SwapBoard(path).request("p", "embed", str(good))
    aside = tmp_path / "aside"
    path.parent.rename(aside)
    try:
        control.apply({"swap": {"id": request, "variant": str(good)}})  # does not raise
        assert "store is unreachable" in control.config_errors[-1]
        assert rt.active_variant == "reference" and rt(torch.randn(3, 256)).shape == (3, 512)
        control.tick()  # still unreachable: nothing applied, nothing lost
        assert rt.active_variant == "reference"
    finally:
        aside.rename(path.parent)
    control.tick()
    assert rt.active_variant == f"variant:{good}"
    control.tick()
    assert [r.outcome for r in SwapBoard(path).reports(request)] == ["swapped"]


def test_serving_while_this_process_traces_a_variant(registry, checkpoint):
    """torch.fx patches nn.Module.__call__ for the whole process while it traces; a replica builds variants (tracing)
    while serving, and no call may fail because of it (found by the demo: "module is not installed as a submodule")."""
    import threading

    from hetforge.optimizer.rewrites import apply_rewrites

    rt = _runtime(registry, checkpoint)
    errors, done = [], threading.Event()

    def serve():
        x = torch.randn(4, 256)
        while not done.is_set():
            try:
                rt(x)
            except Exception as err:  # noqa: BLE001 - collected: the assertion below reports it
                errors.append(f"{type(err).__name__}: {err}")

    server = threading.Thread(target=serve)
    server.start()
    try:
        for _ in range(40):
            apply_rewrites(rt.reference)
    finally:
        done.set()
        server.join()
    assert not errors, errors[:3]
