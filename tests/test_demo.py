"""The README's main command: `hetforge demo` runs end to end on the CPU."""

from tests.conftest import REPO, run_cli


def test_demo_runs_the_whole_story_so_far(tmp_path):
    result = run_cli("demo", timeout=900, env={"HETFORGE_HOME": str(tmp_path), "HETFORGE_RAY_TMP": f"/tmp/hf-ray-demo-{tmp_path.name}"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    out = result.stdout
    assert out.count("ok examples/") == len(list((REPO / "examples").glob("*.yaml")))  # every example pipeline is valid
    assert "critical path" in out and "rerank" in out
    assert "classify: rewrites {'fold_bn': 4}" in out  # the page classifier's batch norms
    assert "verdict: accepted" in out
    assert "variant 1 stored as active" in out and (tmp_path / "registry.sqlite").exists()
    # step 5: deployed on Ray Serve, traffic served, the classifier hot-swapped both ways with no failed request
    assert "deployed in" in out and "0 errors" in out
    assert "variant:1" in out  # classify started on the registered variant
    assert out.count(": swapped") >= 2 and "0 failed requests during the swap" in out
    assert "stopped the deployment and the local Ray instance" in out
