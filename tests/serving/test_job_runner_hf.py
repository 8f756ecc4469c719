"""A background optimization job for a HuggingFace stage: the body a Ray task runs (`run_job`), in-process.

The job gets the stage's own model (no generated problem file) at production's recorded sizes, runs
the optimizer on it, and writes its outcome into the job row: a registered variant of the stage's
fingerprint, or the reason none was registered.
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from hetforge.core.hf import HfSource  # noqa: E402
from hetforge.core.problem import Problem  # noqa: E402
from hetforge.kernels.registry import Registry  # noqa: E402
from hetforge.serving.job_runner import run_job  # noqa: E402
from hetforge.serving.jobs import JobBoard, JobSpec  # noqa: E402
from tests.models import tiny_hf  # noqa: E402


def test_a_job_optimizes_a_huggingface_stage_at_production_sizes(tmp_path):
    folder = tiny_hf.bert(tmp_path / "embed")
    problem = Problem(hf=HfSource(str(folder), "embedding", max_length=32))
    registry_path = str(tmp_path / "registry.sqlite")
    signatures = ["int64[2,16];int64[2,16]", "int64[1,8];int64[1,8]"]
    job = JobBoard(registry_path).queue("p", "embed", "hot", "test", signatures)
    assert job is not None
    spec = JobSpec(
        registry_path=registry_path,
        job_id=job.id,
        pipeline="p",
        stage="embed",
        problem=problem.to_json(),
        device="cpu",
        device_class="cpu",
        precision="strict",
        budget_s=90,
        scratch=str(tmp_path / "scratch"),
        agents=("recipes",),
        signatures=tuple(signatures),
        threads=1,
    )
    result = run_job(spec)
    summary = result["summary"]
    assert summary["candidates"] >= 1 and summary["winner"] is not None, summary
    assert not list((tmp_path / "scratch").rglob("job_*_embed.py"))  # the stage's own model, no generated file
    row = JobBoard(registry_path).get(job.id)
    assert row.state == "done" and row.variant_id == result["variant_id"], row
    if result["variant_id"] is None:
        # eager won, or the winner's speedup did not hold with confidence: the row says which
        assert "not_registered" in summary and summary["not_registered"], summary
    else:
        variant = Registry(registry_path).get(result["variant_id"])
        assert variant.fingerprint == problem.load().fingerprint() and variant.status == "canary"
        assert variant.signature == {"signatures": signatures}
