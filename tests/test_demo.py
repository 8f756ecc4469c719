"""The README's main command: `hetforge demo` runs end to end on the CPU."""

from tests.conftest import run_cli


def test_demo_runs_the_whole_story_so_far(tmp_path):
    result = run_cli("demo", timeout=600, env={"HETFORGE_HOME": str(tmp_path)})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    out = result.stdout
    assert out.count("ok examples/") == 3
    assert "critical path" in out and "rerank" in out
    assert "classify: rewrites {'fold_bn': 4}" in out  # the page classifier's batch norms
    assert "verdict: accepted" in out
    assert "variant 1 stored as active" in out and (tmp_path / "registry.sqlite").exists()
