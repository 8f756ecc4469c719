"""Graph capture of real models (torch.export, fx as the fallback) and the agents matching on ATen graphs."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from hetforge.core.hf import HfSource
from hetforge.core.problem import InputSpec, Problem
from hetforge.optimizer.capture import EXPORT, FX, CaptureError, capture
from hetforge.optimizer.judge import VerifyOptions, verify
from hetforge.optimizer.library import fuse_graph
from hetforge.optimizer.recipes import Recipe, recipe_candidate_source
from hetforge.optimizer.rewrites import apply_rewrites, rewrite_graph
from hetforge.optimizer.variants import VariantError, VariantSpec, build_variant, variant_candidate_source
from tests.optimizer.models.encoder import Encoder

pytest.importorskip("transformers")
from tests.models import tiny_hf  # noqa: E402 - needs transformers

CHECK = VerifyOptions(trials=2, time=False, trusted_candidate=True, startup_timeout_s=300, timeout_s=300)
TEXT_BUCKETS = ((("batch", 2), ("seq", 16)), (("batch", 3), ("seq", 7)))


@pytest.fixture(scope="module")
def bert_problem(tmp_path_factory) -> Problem:
    folder = tiny_hf.bert(tmp_path_factory.mktemp("bert") / "bert")
    return Problem(hf=HfSource(str(folder), "embedding", max_length=16), buckets=TEXT_BUCKETS)


def _same(reference: nn.Module, variant: nn.Module, input_sets: list[list]) -> None:
    for inputs in input_sets:
        with torch.no_grad():
            torch.testing.assert_close(variant(*inputs), reference(*inputs), atol=1e-5, rtol=1e-5)


def test_hf_bert_captures_with_export_and_the_library_finds_gemm_epilogues_and_norms(bert_problem):
    loaded = bert_problem.load()
    model, inputs = loaded.build(), loaded.main_inputs(0)
    gm = capture(model, inputs)
    assert gm.meta["capture"] == EXPORT
    counts = fuse_graph(gm, inputs)
    assert counts["gemm_epilogue"] == 13 and counts["norm"] == 5  # 2 layers x 6 linears + pooler; 2 x 2 + embeddings
    variant = build_variant(model, VariantSpec(library=True), inputs)
    _same(model, variant, loaded.input_sets(1))  # every bucket: one graph per input signature


def test_rewrites_fold_whisper_query_scaling_on_the_aten_graph(tmp_path):
    folder = tiny_hf.whisper_encoder(tmp_path / "whisper")
    loaded = Problem(hf=HfSource(str(folder), "audio_encoder")).load()
    model, inputs = loaded.build(), loaded.main_inputs(0)
    gm = capture(model, inputs)
    applied = rewrite_graph(gm)
    assert applied.get("fold_scale") == 2  # q_proj(x) * scaling, once per layer
    _same(model, build_variant(model, VariantSpec(rewrites=tuple(applied)), inputs), loaded.input_sets(1))


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 4), nn.Linear(4, 64)

    def forward(self, x):
        return self.b(self.a(x)).sum(-1) * 0.5


def test_merge_and_sum_rewrites_match_aten_linear():
    torch.manual_seed(0)
    model, x = TwoLinears().eval(), torch.randn(5, 64)
    gm, applied = apply_rewrites(model, None, [x])
    assert gm.meta["capture"] == EXPORT
    assert applied.get("sum_linear") == 1
    torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=1e-5)


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum().item() > 0:  # a branch on a value: neither export nor symbolic tracing can follow it
            return x * 2
        return x


def test_capture_failure_names_what_broke_it():
    with pytest.raises(CaptureError) as caught:
        capture(DataDependent(), [torch.randn(3)])
    message = str(caught.value)
    assert message.startswith("torch.export: data-dependent control flow at test_capture.py:")
    assert "aten._local_scalar_dense" in message and FX in message
    with pytest.raises(VariantError, match="no graph to transform: torch.export"):
        build_variant(DataDependent(), VariantSpec(library=True), [torch.randn(3)])


def test_fx_is_the_fallback_when_export_fails(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("unsupported operator aten.frobnicate.default")

    monkeypatch.setattr(torch.export, "export", refuse)
    torch.manual_seed(0)
    model, x = TwoLinears().eval(), torch.randn(5, 64)
    gm = capture(model, [x])
    assert gm.meta["capture"] == FX
    assert gm.meta["export_error"].startswith("torch.export: RuntimeError: unsupported operator")
    assert "(aten.frobnicate.default)" in gm.meta["export_error"]
    assert fuse_graph(gm, [x]) == {"gemm_epilogue": 2}  # call_module(nn.Linear) nodes
    torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=1e-5)


def test_verifier_judges_module_stage_variants_against_its_checkpoint(tmp_path):
    torch.manual_seed(3)
    save_file(Encoder().state_dict(), str(tmp_path / "enc.safetensors"))
    (tmp_path / "enc.py").write_text(_encoder_source())
    problem = Problem(
        module="enc.py:Encoder",
        base_dir=str(tmp_path),
        signature=(InputSpec("x", ("batch", "seq", 32)),),
        weights="enc.safetensors",
        buckets=TEXT_BUCKETS,
    )
    for name, source in (
        ("library", variant_candidate_source(problem, VariantSpec(library=True))),
        ("eager", recipe_candidate_source(problem, Recipe("eager"))),
    ):
        path = tmp_path / f"{name}.py"
        path.write_text(source)
        verdict = verify(problem, path, CHECK)
        assert verdict.accepted, (name, verdict.reasons)


def test_verifier_accepts_rewrites_and_library_of_an_hf_embedder(bert_problem, tmp_path):
    for spec in (VariantSpec(rewrites=("dead_code",)), VariantSpec(rewrites=("dead_code",), library=True)):
        path = tmp_path / f"{spec.label()}.py"
        path.write_text(variant_candidate_source(bert_problem, spec))
        verdict = verify(bert_problem, path, CHECK)
        assert verdict.accepted, (spec.label(), verdict.reasons)


def _encoder_source() -> str:
    from pathlib import Path

    return (Path(__file__).parent / "models" / "encoder.py").read_text()
