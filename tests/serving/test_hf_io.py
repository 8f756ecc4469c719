"""HuggingFace stages' client data in the replica (`hf_io`), the stage runtime over every model source, a
replica's start-up failure read back from Serve's message, and production problems for module and HF stages."""

from __future__ import annotations

import base64
import io
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")

from prometheus_client import CollectorRegistry  # noqa: E402

from hetforge.core.hf import HfSource  # noqa: E402
from hetforge.core.problem import InputSpec, Problem  # noqa: E402
from hetforge.kernels.registry import Registry  # noqa: E402
from hetforge.serving.dataflow import StageError  # noqa: E402
from hetforge.serving.deploy import startup_failures  # noqa: E402
from hetforge.serving.hf_io import HfIO  # noqa: E402
from hetforge.serving.job_runner import production_problem, production_sizes, write_production_problem  # noqa: E402
from hetforge.serving.metrics import Metrics  # noqa: E402
from hetforge.serving.stage_runtime import ModelStageRuntime  # noqa: E402
from tests.models import tiny_hf  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {
        "embed": tiny_hf.bert(root / "embed"),
        "rerank": tiny_hf.bert(root / "rerank", classifier=True),
        "whisper": tiny_hf.whisper_encoder(root / "whisper"),
        "vit": tiny_hf.vit(root / "vit"),
    }


def _stage(name="s", buckets=(), labels=None):
    return SimpleNamespace(name=name, buckets=list(buckets), labels=labels)


def _setup(folder, task, buckets=(), tmp_path=None, **kw):
    source = HfSource(str(folder), task, max_length=kw.pop("max_length", 32), **kw)
    problem = Problem(hf=source, buckets=tuple(tuple(sorted(b.items())) for b in buckets))
    registry = Registry((tmp_path or folder) / "registry.sqlite")
    runtime = ModelStageRuntime("p", "s", problem, registry=registry, metrics=Metrics(CollectorRegistry()))
    return HfIO(_stage(buckets=buckets), source, folder), runtime


def test_text_is_padded_to_the_smallest_bucket_and_padding_changes_nothing(models, tmp_path):
    buckets = [{"batch": 1, "seq": 8}, {"batch": 4, "seq": 16}]
    hf, runtime = _setup(models["embed"], "embedding", buckets, tmp_path)
    short, long = hf.decode({"text": "an embedding model"}), hf.decode({"texts": ["a reranker scores a query"] * 3})
    outs = hf.run(runtime, [short, long])
    assert runtime.signatures.snapshot() == {"int64[4,16];int64[4,16]": 1}  # one bucket shape, two requests
    alone = hf.run(runtime, [short])[0]
    assert runtime.signatures.snapshot()["int64[1,8];int64[1,8]"] == 1
    torch.testing.assert_close(outs[0], alone, atol=1e-5, rtol=1e-5)
    one = hf.encode(outs[0], {"text": "x"})
    many = hf.encode(outs[1], {"texts": ["x"] * 3})
    assert len(one["embedding"]) == 32 and len(many["embeddings"]) == 3
    assert abs(sum(v * v for v in one["embedding"]) - 1) < 1e-5


def test_requests_no_bucket_holds_are_the_clients_422_naming_the_limit(models, tmp_path):
    hf, _ = _setup(models["embed"], "embedding", [{"batch": 2, "seq": 8}], tmp_path)
    for payload, field, words in (
        ({"texts": ["a"] * 3}, "texts", "batch 2 seq 8"),
        ({"text": "the verifier checks every candidate on fresh inputs today"}, "text", "batch 2 seq 8"),
        ({"text": 3}, "text", "a string"),
        ({"texts": []}, "texts", "non-empty list"),
        ({"query": "q"}, None, 'fields "text" or "texts"'),
    ):
        with pytest.raises(StageError) as err:
            hf.decode(payload)
        assert err.value.status == 422 and "stage s" in str(err.value) and words in str(err.value), str(err.value)
        if field:
            assert f"field {field}" in str(err.value)


def test_reranking_scores_one_per_document_through_pairs(models, tmp_path):
    hf, runtime = _setup(models["rerank"], "classification", [{"batch": 4, "seq": 32}], tmp_path)
    payload = {"query": "what is the capital of france", "documents": ["paris is the capital", "a reranker"]}
    out = hf.encode(hf.run(runtime, [hf.decode(payload)])[0], payload)
    assert list(out) == ["scores"] and len(out["scores"]) == 2
    tok = hf.processor
    enc = tok([payload["query"]] * 2, payload["documents"], return_tensors="pt", padding=True)
    with torch.inference_mode():
        want = runtime.reference(enc["input_ids"], enc["attention_mask"])[:, 0]
    torch.testing.assert_close(torch.tensor(out["scores"]), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(StageError, match="field query"):
        hf.decode({"query": 1, "documents": ["a"]})


def test_audio_and_images_go_through_their_processors(models, tmp_path):
    from transformers import WhisperFeatureExtractor

    from hetforge.core.hf import HfError

    # An extractor that makes 1 s of 10 ms frames does not fit a model of 32 frames: refused at start-up.
    WhisperFeatureExtractor(feature_size=16, n_samples=32 * 160, chunk_length=1).save_pretrained(models["whisper"])
    with pytest.raises(HfError, match=r"makes features of shape \[16, 100\], the model takes \[16, 32\]"):
        _setup(models["whisper"], "audio_encoder", (), tmp_path)
    WhisperFeatureExtractor(feature_size=16, chunk_length=1, hop_length=500).save_pretrained(models["whisper"])
    audio, runtime = _setup(models["whisper"], "audio_encoder", (), tmp_path)
    samples = torch.randn(16000).tolist()
    out = audio.encode(audio.run(runtime, [audio.decode({"audio": samples, "sampling_rate": 16000})])[0], {})
    assert len(out["embedding"]) == 32
    with pytest.raises(StageError, match="field sampling_rate: got 8000; the model takes 16000"):
        audio.decode({"audio": samples, "sampling_rate": 8000})

    from PIL import Image

    vision, runtime = _setup(models["vit"], "vision_encoder", (), tmp_path)
    buffer = io.BytesIO()
    Image.new("RGB", (40, 24), (200, 30, 10)).save(buffer, format="PNG")
    payload = {"image": base64.b64encode(buffer.getvalue()).decode()}
    out = vision.encode(vision.run(runtime, [vision.decode(payload)])[0], payload)
    assert len(out["embedding"]) == 32
    for bad, why in (("%%%", "not base64"), (base64.b64encode(b"not an image").decode(), "not a readable")):
        with pytest.raises(StageError, match=why):
            vision.decode({"image": bad})


def test_module_stage_runtime_uses_its_checkpoint_and_fingerprint(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "head.py").write_text(
        "import torch.nn as nn\n\nclass Head(nn.Module):\n    def __init__(self, d=4):\n        super().__init__()\n"
        "        self.lin = nn.Linear(d, 2)\n\n    def forward(self, x):\n        return self.lin(x)\n"
    )
    state = {"lin.weight": torch.ones(2, 4), "lin.bias": torch.zeros(2)}
    save_file(state, str(tmp_path / "head.safetensors"))
    problem = Problem(
        module="head.py:Head",
        base_dir=str(tmp_path),
        signature=(InputSpec("x", ("batch", 4)),),
        weights="head.safetensors",
        init_kwargs={"d": 4},
    )
    runtime = ModelStageRuntime(
        "p", "head", problem, registry=Registry(tmp_path / "r.sqlite"), metrics=Metrics(CollectorRegistry())
    )
    torch.testing.assert_close(runtime(torch.ones(1, 4)), torch.full((1, 2), 4.0))
    assert runtime.fingerprint == problem.load().fingerprint()
    save_file({**state, "lin.bias": torch.ones(2)}, str(tmp_path / "head.safetensors"))
    assert problem.load().fingerprint() != runtime.fingerprint  # a new checkpoint is another reference


def test_a_replica_start_up_failure_is_read_back_as_one_line():
    traceback = (
        "The deployment failed to start 3 times in a row. This may be due to a problem with its constructor or "
        "initial health check failing. See controller logs for details. Error:\n"
        "ray::ServeReplica:p:stage-head.initialize_and_get_metadata() (pid=1, ip=127.0.0.1)\n"
        '  File "/x/deployments.py", line 120, in __init__\n'
        'hetforge.spec.stages.StageCodeError: p.yaml:6: stage "head": ValueError: hidden (30) is odd\n'
    )
    assert startup_failures({"stage-head": traceback}) == ['p.yaml:6: stage "head": ValueError: hidden (30) is odd']
    plain = traceback.replace('hetforge.spec.stages.StageCodeError: p.yaml:6: stage "head": ', "vllm.errors.")
    assert startup_failures({"stage-reply": plain}, {"reply": "p.yaml:20"}) == [
        'p.yaml:20: stage "reply": ValueError: hidden (30) is odd'
    ]
    assert startup_failures({"stage-x": "Deploying."}) == []


def test_production_problems_of_module_and_hf_stages(models, tmp_path):
    module = Problem(module="m.py:M", base_dir=str(tmp_path), signature=(InputSpec("x", ("batch", "d")),))
    assert production_sizes(module, ["float32[3,16]", "float32[3,16]", "int64[2]", "float32[1,8]"]) == [
        {"batch": 3, "d": 16},
        {"batch": 1, "d": 8},
    ]
    hf = Problem(hf=HfSource(str(models["embed"]), "embedding", max_length=32))
    assert production_sizes(hf, ["int64[4,16];int64[4,16]", "float32[2,3]"]) == [{"batch": 4, "seq": 16}]
    built_problem = production_problem(
        tmp_path, 3, "p", "embed", hf, ["int64[4,16];int64[4,16]", "int64[1,8];int64[1,8]"]
    )
    assert built_problem.hf == hf.hf and built_problem.file is None  # the stage's own model, no generated file
    assert not list(tmp_path.glob("job_*.py"))
    with pytest.raises(ValueError, match="not a problem file"):
        write_production_problem(tmp_path, 3, "p", "embed", hf, ["int64[4,16];int64[4,16]"])
    loaded = Problem.from_json(built_problem.to_json()).load()  # as the job's OptimizeTask carries it
    assert [list(x.shape) for x in loaded.get_inputs()] == [[4, 16], [4, 16]]
    assert [[list(x.shape) for x in v] for v in loaded.get_variants()] == [[[1, 8], [1, 8]]]
    built = loaded.build()
    assert built(*loaded.get_inputs()).shape == (4, 32)
