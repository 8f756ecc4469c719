"""`hetforge optimize` on small problems of the benchmark suite (CPU sizes), as CI runs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli

SUITE = Path(__file__).resolve().parents[2] / "bench" / "suite" / "problems"


def test_suite_has_three_tiers_of_25_problems():
    names = sorted(p.stem for p in SUITE.glob("t*.py"))
    assert len(names) >= 25
    assert {n[:2] for n in names} == {"t1", "t2", "t3"}


@pytest.mark.parametrize("problem", ["t2_gemm_bn_relu", "t2_layernorm_gelu_scale", "t3_swiglu_block"])
def test_optimize_recipes_rewrites_library_on_cpu(tmp_path, problem):
    out = tmp_path / "out"
    result = run_cli(
        "optimize",
        str(SUITE / f"{problem}.py"),
        "--agents",
        "recipes,rewrites,library",
        "--recipes",
        "eager",
        "--budget-s",
        "600",
        "--trials",
        "1",
        "--rounds",
        "2",
        "--out",
        str(out),
        "--json",
        env={"HETFORGE_HOME": str(tmp_path / "home"), "HETFORGE_BENCH_SIZE": "cpu"},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["verdict"] == "accepted" and Path(summary["best_variant_path"]).is_file()
    report = json.loads((out / "report.json").read_text())
    by_agent = {c["agent"]: c for c in report["candidates"]}
    # every agent produced a candidate the verifier accepted (which one is fastest is the CPU's call)
    assert by_agent["library"]["verdict"]["verdict"] == "accepted", by_agent["library"]["note"]
    assert by_agent["recipes"]["verdict"]["verdict"] == "accepted"
    if problem == "t2_gemm_bn_relu":
        assert (
            by_agent["rewrites"]["name"] == "rewrites:fold_bn"
            and by_agent["rewrites"]["verdict"]["verdict"] == "accepted"
        )
