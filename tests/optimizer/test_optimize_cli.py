"""`hetforge optimize` on a pipeline's module stage, a module path with an input spec, and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.conftest import run_cli
from tests.optimizer.models.encoder import Encoder

ENCODER = Path(__file__).parent / "models" / "encoder.py"
PIPELINE = """\
name: t
entry: enc
output: broken
stages:
  - name: enc
    kind: model
    module: encoder.py:Encoder
    weights: enc.safetensors
    inputs:
      - {name: x, shape: [batch, seq, 32]}
    buckets:
      - {batch: 2, seq: 8}
      - {batch: 1, seq: 5}
  - name: broken
    kind: model
    module: encoder.py:Encoder
    init_args: [33]
    inputs:
      - {name: x, shape: [batch, seq, 32]}
flow:
  - {from: enc, to: broken}
"""
FAST = ("--agents", "recipes,rewrites,library", "--recipes", "eager", "--no-compose", "--trials", "1", "--rounds", "1")


def _pipeline(tmp_path: Path) -> Path:
    (tmp_path / "encoder.py").write_text(ENCODER.read_text())
    torch.manual_seed(5)
    save_file(Encoder().state_dict(), str(tmp_path / "enc.safetensors"))
    path = tmp_path / "p.yaml"
    path.write_text(PIPELINE)
    return path


def _summary(result) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_optimize_a_pipeline_module_stage_with_its_checkpoint(tmp_path):
    pipeline = _pipeline(tmp_path)
    out = tmp_path / "out"
    result = run_cli(
        "optimize", str(pipeline), "--stage", "enc", *FAST, "--budget-s", "90", "--out", str(out), "--json"
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    verdicts = {c["name"]: c["status"] for c in report["candidates"]}
    assert verdicts["library:kernels"] in ("accepted", "winner"), report["candidates"]
    assert report["task"]["problem"]["module"] == "encoder.py:Encoder"
    assert _summary(result)["verdict"] == "accepted"


def test_a_failing_constructor_is_one_line_naming_the_stage(tmp_path):
    pipeline = _pipeline(tmp_path)
    result = run_cli("optimize", str(pipeline), "--stage", "broken", "--budget-s", "20")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert f'{pipeline}:14: stage "broken": AssertionError: embed_dim must be divisible by num_heads' in line


def test_optimize_a_module_path_with_an_input_spec(tmp_path):
    out = tmp_path / "out"
    result = run_cli(
        "optimize",
        "tests.optimizer.models.encoder:Encoder",
        "--inputs",
        "x:batch,seq,32:float32",
        "--init-args",
        '{"d_model": 32}',
        "--bucket",
        "batch=2,seq=8",
        "--bucket",
        "batch=1,seq=3",
        *FAST,
        "--budget-s",
        "90",
        "--out",
        str(out),
        "--json",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["task"]["problem"]["buckets"] == [{"batch": 2, "seq": 8}, {"batch": 1, "seq": 3}]
    assert {c["name"] for c in report["candidates"]} >= {"recipe:eager", "library:kernels"}


def test_module_path_errors_are_one_line():
    missing = run_cli("optimize", "tests.optimizer.models.encoder:Encoder")
    assert missing.returncode == 2 and "needs --inputs" in missing.stderr
    bad = run_cli("optimize", "tests.optimizer.models.encoder:Encoder", "--inputs", "x:batch,8:floaty")
    assert bad.returncode == 2 and 'Got "floaty" for the dtype of input x' in bad.stderr
    absent = run_cli("optimize", "tests.optimizer.models.encoder:Nope", "--inputs", "x:batch,8")
    assert absent.returncode == 1 and "Traceback" not in absent.stderr
    assert "module tests.optimizer.models.encoder:Nope" in absent.stderr
