"""HuggingFace stages as problems: built from local folders, padding-invariant, fingerprinted by weights, offline."""

from __future__ import annotations

import pytest
import torch

from hetforge.core.hf import HfSource
from hetforge.core.problem import Problem, ProblemError
from tests.models import tiny_hf

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {
        "embed": tiny_hf.bert(root / "embed"),
        "rerank": tiny_hf.bert(root / "rerank", classifier=True),
        "whisper": tiny_hf.whisper_encoder(root / "whisper"),
        "vit": tiny_hf.vit(root / "vit"),
        "t5": tiny_hf.t5_encoder(root / "t5"),
    }


def _problem(folder, task, **kw):
    buckets = kw.pop("buckets", ())
    return Problem(hf=HfSource(str(folder), task, **kw), buckets=buckets)


@pytest.mark.parametrize(
    "name, task, shape",
    [
        ("embed", "embedding", (1, 32)),
        ("rerank", "classification", (1, 1)),
        ("whisper", "audio_encoder", (1, 32)),
        ("vit", "vision_encoder", (1, 32)),
        ("t5", "embedding", (1, 32)),
    ],
)
def test_each_task_builds_and_runs(models, name, task, shape):
    loaded = _problem(models[name], task, max_length=16).load()
    module = loaded.build()
    out = module(*loaded.main_inputs(seed=0))
    assert out.shape == shape and torch.isfinite(out).all()


def test_mean_pooling_ignores_padding(models):
    loaded = _problem(models["embed"], "embedding").load()
    module = loaded.build()
    ids = torch.randint(5, 50, (1, 6))
    short = module(ids, torch.ones(1, 6, dtype=torch.long))
    padded = module(torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1), torch.tensor([[1] * 6 + [0] * 4]))
    torch.testing.assert_close(short, padded, atol=1e-5, rtol=1e-5)
    assert torch.allclose(short.norm(dim=-1), torch.ones(1))


def test_buckets_are_the_main_inputs_and_the_variants(models):
    loaded = _problem(
        models["embed"], "embedding", buckets=((("batch", 2), ("seq", 8)), (("batch", 4), ("seq", 16)))
    ).load()
    main, *variants = loaded.input_sets(seed=3)
    assert [t.shape for t in main] == [(2, 8), (2, 8)] and [t.shape for t in variants[0]] == [(4, 16), (4, 16)]
    assert main[1][-1].all()  # the last row is full length


def test_the_json_form_round_trips_and_the_fingerprint_follows_the_weights(models, tmp_path):
    problem = _problem(models["embed"], "embedding", buckets=((("batch", 2),),))
    again = Problem.from_json(problem.to_json())
    assert again == problem and again.load().fingerprint() == problem.load().fingerprint()
    assert _problem(models["embed"], "embedding", pooling="cls").load().fingerprint() != problem.load().fingerprint()
    retrained = tiny_hf.bert(tmp_path / "other", seed=1)
    assert _problem(retrained, "embedding").load().fingerprint() != problem.load().fingerprint()


def test_a_model_id_missing_from_the_cache_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(
        ProblemError, match='model "acme/no-such-model" is neither a folder here nor in the local HuggingFace cache'
    ):
        _problem("acme/no-such-model", "embedding").load()
