"""The README's main command: `hetforge demo` tells the whole story on the CPU, unattended."""

from tests.conftest import REPO, run_cli


def test_demo_runs_the_whole_story(tmp_path):
    result = run_cli(
        "demo",
        timeout=900,
        env={"HETFORGE_HOME": str(tmp_path), "HETFORGE_RAY_TMP": f"/tmp/hf-ray-demo-{tmp_path.name}"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    out = result.stdout
    assert out.count("ok examples/") == len(list((REPO / "examples").glob("*.yaml")))  # every example pipeline is valid
    assert "critical path: classify -> extract -> report" in out and "hot stages: classify" in out
    assert "deployed in" in out and "/dashboard" in out
    assert "end to end: p50" in out and "; 0 errors" in out
    # the controller's decisions, printed as they happen: hot stage, job, winner, shadow, canary, promotion
    assert "classify is hot" in out and "optimization job 1 started" in out
    assert "job 1 done in" in out and "-> variant 1" in out
    for decision in ("start variant 1", "advance variant 1", "promote variant 1"):
        assert decision in out, decision
    assert (
        "end to end p50 ms" in out and "classify p50 ms (variant:1)" in out
    )  # before/after, classify now on the variant
    assert "classify compute p50 ms (replica metric)" in out
    assert ", 0 failed;" in out and "hot -> promoted in" in out
    assert "stopped the deployment and the local Ray instance" in out
    from hetforge.kernels.registry import Registry

    assert Registry(tmp_path / "demo" / "registry.sqlite").get(1).status == "active"
