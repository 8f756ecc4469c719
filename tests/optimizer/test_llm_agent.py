"""LLM agents against a local OpenAI-compatible server replaying recorded answers.

Prose without code, code that does not compile, code that raises, code that is wrong and a
failing endpoint each become a rejected candidate; a correct answer is accepted and can win.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hetforge.optimizer import llm_agent
from tests.conftest import run_cli
from tests.optimizer.replay_server import ReplayServer

PROBLEM = Path(__file__).parent / "problems" / "linear_relu.py"

CORRECT = """Here is a version that folds the scale into the GEMM:
```python
import torch
import torch.nn as nn


class ModelNew(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x):
        return torch.relu(torch.addmm(self.lin.bias, x, self.lin.weight.t())).mul_(2.0)
```
"""
WRONG = CORRECT.replace(".mul_(2.0)", ".mul_(3.0)")
NOT_COMPILING = "```python\nimport torch\nclass ModelNew(torch.nn.Module:\n    pass\n```"
RAISES = CORRECT.replace("return torch.relu", "raise RuntimeError('kernel launch failed')\n        return torch.relu")
PROSE = "To speed this up you could fuse the ReLU and the scale into the GEMM epilogue. Good luck!"

ANSWERS = {"fuse": [PROSE, CORRECT], "reexpress": [NOT_COMPILING, WRONG], "tile": ["HTTP 500", RAISES]}


def test_extract_code_takes_the_block_defining_model_new():
    assert llm_agent.extract_code(PROSE) is None
    assert "class ModelNew" in llm_agent.extract_code("```python\nx = 1\n```\ntext\n" + CORRECT)
    assert llm_agent.extract_code("```\nprint(1)\n```") == "print(1)\n"


def test_prompt_carries_source_device_profile_history_and_hint():
    history = [llm_agent.Attempt("library", 0, "rejected", "values: 3 elements differ")]
    text = llm_agent.first_prompt(
        "class Model: ...",
        {"name": "H100", "multiprocessors": 132},
        [{"name": "aten::addmm", "share": 0.8, "us_per_call": 12.0}],
        history,
        "use tf32x3",
    )
    for part in (
        "class Model",
        "H100",
        "multiprocessors",
        "aten::addmm: 80.0%",
        "values: 3 elements differ",
        "use tf32x3",
    ):
        assert part in text
    assert "TF32" in llm_agent.system_prompt("fuse", "strict")


def test_swarm_every_bad_answer_is_a_rejected_candidate(tmp_path):
    with ReplayServer(ANSWERS) as server:
        env = {
            "HETFORGE_LLM_BASE_URL": server.base_url,
            "HETFORGE_LLM_MODEL": "replay",
            "HETFORGE_LLM_API_KEY": "test",
            "HETFORGE_HOME": str(tmp_path / "home"),
        }
        result = run_cli(
            "optimize",
            str(PROBLEM),
            "--agents",
            "llm",
            "--llm-turns",
            "2",
            "--hint",
            "think about the epilogue",
            "--budget-s",
            "600",
            "--out",
            str(tmp_path / "out"),
            "--json",
            env=env,
            timeout=600,
        )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["winner_agent"] == "llm" and summary["verdict"] == "accepted"
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    by_name = {c["name"]: c for c in report["candidates"]}
    assert by_name["llm:fuse:turn1"]["status"] == "rejected" and "no_code" in by_name["llm:fuse:turn1"]["note"]
    assert by_name["llm:fuse:turn2"]["status"] == "winner"
    assert (
        by_name["llm:reexpress:turn1"]["status"] == "rejected"
        and "SyntaxError" in by_name["llm:reexpress:turn1"]["note"]
    )
    assert by_name["llm:reexpress:turn2"]["status"] == "rejected" and "values" in by_name["llm:reexpress:turn2"]["note"]
    assert by_name["llm:tile:turn1"]["status"] == "rejected" and "endpoint_error" in by_name["llm:tile:turn1"]["note"]
    assert (
        by_name["llm:tile:turn2"]["status"] == "rejected"
        and "kernel launch failed" in by_name["llm:tile:turn2"]["note"]
    )
    # the hint reached every prompt, and each second turn carried the verifier's word on the first
    assert len(server.requests) >= 6
    assert all("think about the epilogue" in json.dumps(r["messages"]) for r in server.requests)
    second = [r for r in server.requests if sum(m["role"] == "assistant" for m in r["messages"]) == 1]
    texts = {json.dumps(r["messages"]) for r in second}
    assert any("no Python code block" in t for t in texts) and any("SyntaxError" in t for t in texts)


def test_no_endpoint_skips_with_one_line_notice(tmp_path):
    env = {
        "HETFORGE_LLM_BASE_URL": "",
        "OPENAI_BASE_URL": "",
        "OPENAI_API_KEY": "",
        "HETFORGE_LLM_MODEL": "",
        "HETFORGE_HOME": str(tmp_path / "home"),
    }
    result = run_cli(
        "optimize", str(PROBLEM), "--agents", "llm", "--out", str(tmp_path / "out"), "--json", env=env, timeout=300
    )
    assert result.returncode == 1  # no candidate at all: no winner
    assert "llm agents skipped: no endpoint configured" in result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["candidates"] == [] and report["notices"]


@pytest.mark.parametrize("precision", ["strict", "tf32", "bf16"])
def test_system_prompt_states_the_policy(precision):
    assert f"Precision policy: {precision}" in llm_agent.system_prompt("tile", precision)
