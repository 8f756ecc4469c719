"""`hetforge plan` on the examples, on this machine and on a declared cluster; bad input exits 1."""

from __future__ import annotations

import json

import pytest

from tests.conftest import EXAMPLES, run_cli

CLUSTER = EXAMPLES / "clusters" / "mixed.yaml"


@pytest.fixture
def home(tmp_path):
    return {"HETFORGE_HOME": str(tmp_path / "home")}


def _plan(*args, env):
    result = run_cli("plan", *args, "--json", env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["retrieval_agent", "voice_agent", "document_pipeline"])
def test_plan_examples_on_this_machine(name, home):
    plan = _plan(str(EXAMPLES / f"{name}.yaml"), env=home)
    assert set(plan) >= {"stages", "critical_path", "predicted_latency_ms", "hot_stages"}
    for stage in plan["stages"].values():
        assert stage["device"] == "cpu"  # this machine has no GPU
        assert stage["source"] in ("measured", "estimated") and stage["latency_ms"] > 0
    models = {"retrieval_agent": {"embed", "rerank"}, "voice_agent": {"listen"}, "document_pipeline": {"classify"}}[
        name
    ]
    assert {n for n, s in plan["stages"].items() if s["source"] == "measured"} == models
    assert plan["critical_path"] and plan["hot_stages"]
    assert set(plan["hot_stages"]) <= models


def test_profiles_are_cached_between_plans(home):
    first = _plan(str(EXAMPLES / "voice_agent.yaml"), env=home)
    second = _plan(str(EXAMPLES / "voice_agent.yaml"), env=home)
    assert first["stages"]["listen"]["latency_ms"] == second["stages"]["listen"]["latency_ms"]


def test_plan_on_declared_heterogeneous_cluster(home):
    plan = _plan(str(EXAMPLES / "retrieval_agent.yaml"), "--cluster", str(CLUSTER), env=home)
    stages = plan["stages"]
    assert stages["router"]["device"] == "cpu"  # the spec pins it
    assert stages["search"]["device"] == "cpu"  # tools run on CPUs
    assert stages["answer"]["device"] in ("H100", "L4")  # an LLM is far faster on a GPU
    assert stages["rerank"]["source"] == "estimated"  # no such GPU here: roofline
    assert stages["answer"]["ray_actor_options"]["accelerator_type"] == stages["answer"]["device"]
    assert plan["inventory"]["classes"]["H100"]["count"] == 8
    assert plan["exact"]


def test_throughput_objective(home):
    plan = _plan(str(EXAMPLES / "voice_agent.yaml"), "--cluster", str(CLUSTER), "--objective", "throughput", env=home)
    assert plan["objective"] == "throughput" and plan["throughput_rps"] > 0


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_unknown_gpu_in_cluster_file_is_located(tmp_path, home):
    bad = _write(
        tmp_path,
        "c.yaml",
        "name: c\nnodes:\n  - name: n\n    cpu: {cores: 4, memory_gib: 8}\n    gpus: [{model: TPU9}]\n",
    )
    result = run_cli("plan", str(EXAMPLES / "voice_agent.yaml"), "--cluster", str(bad), env=home)
    assert result.returncode == 1
    assert f'{bad}:5:20: Got "TPU9" for nodes[0].gpus[0].model: a GPU model' in result.stderr


def test_malformed_cluster_file_is_located(tmp_path, home):
    bad = _write(tmp_path, "c.yaml", "name: c\nnodes:\n  - name: n\n    cpu: {cores: many}\n    gpu: []\n")
    result = run_cli("plan", str(EXAMPLES / "voice_agent.yaml"), "--cluster", str(bad), env=home)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert ':4:18: Got "many" for nodes[0].cpu.cores: an integer.' in result.stderr
    assert ':5:5: Got "gpu" for nodes[0].gpu: not a field of a node type; did you mean "gpus"?' in result.stderr


def test_constraint_no_device_meets(tmp_path, home):
    text = (EXAMPLES / "voice_agent.yaml").read_text().replace("    prefer_device: H100\n", "    device: A100\n")
    pipeline = _write(
        tmp_path,
        "p.yaml",
        text.replace("models/", str(EXAMPLES / "models") + "/").replace("tools/", str(EXAMPLES / "tools") + "/"),
    )
    result = run_cli("plan", str(pipeline), "--cluster", str(CLUSTER), env=home)
    assert result.returncode == 1
    assert 'stage "listen": device A100 is not in the inventory (have: H100, L4, cpu)' in result.stderr


def test_stage_that_fits_nowhere(tmp_path, home):
    cluster = _write(tmp_path, "tiny.yaml", "name: tiny\nnodes:\n  - name: n\n    cpu: {cores: 2, memory_gib: 1}\n")
    result = run_cli("plan", str(EXAMPLES / "voice_agent.yaml"), "--cluster", str(cluster), env=home)
    assert result.returncode == 1
    assert 'stage "agent": needs 2.00 GiB for 1 replica(s); the largest allowed device (cpu) has 1 GiB' in result.stderr
