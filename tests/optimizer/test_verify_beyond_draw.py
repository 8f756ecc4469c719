"""The verifier beyond the problem's own draw, and candidates that look at where they run.

A candidate may be right on every input the problem draws and wrong on served traffic (it drops a ReLU on inputs
drawn non-negative): the judge also checks inputs moved outside the draw (sign flips, scaled, special values)
wherever the reference's output stays finite there. A candidate whose source reads its environment, argv, process or
parent, or the judge's files, can behave one way when judged: it is flagged for review."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from hetforge.core.problem import Problem
from hetforge.optimizer import verdict as V
from hetforge.optimizer.correctness import BEYOND_THE_DRAW, beyond_the_draw, nonfinite_count
from hetforge.optimizer.judge import VerifyOptions, verify
from hetforge.optimizer.static_checks import context_flag, review_flags

HERE = Path(__file__).resolve().parent
PROBLEMS, CANDIDATES = HERE / "problems", HERE / "candidates"
FAST = dict(trials=2, rounds=1, calls_per_round=2, warmup=1, threads=1, time=False)


def judge(problem: str, candidate: str, **overrides) -> V.Verdict:
    options = VerifyOptions(**{**FAST, **overrides})
    return verify(Problem(file=str(PROBLEMS / f"{problem}.py")), CANDIDATES / f"{candidate}.py", options)


def test_a_candidate_exploiting_the_draw_is_rejected_beyond_it():
    result = judge("relu_input", "drops_input_relu")
    assert not result.accepted
    assert result.reasons[0].kind == V.RejectKind.MISMATCH, result.reasons
    assert "beyond the problem's draw (signs" in result.reasons[0].message, result.reasons[0].message
    assert all(t.ok for t in result.trials)  # right on every input the problem itself draws


def test_the_same_math_kept_for_every_input_is_accepted_beyond_the_draw():
    result = judge("relu_input", "legit_relu_input_clamp")
    assert result.accepted, result.reasons
    assert "inputs beyond the draw: checked signs, scaled, special" in result.notes, result.notes


@pytest.mark.parametrize(
    "problem, candidate",
    [
        ("linear_relu", "legit_addmm_folded_scale"),
        ("softmax", "legit_softmax_explicit"),
        ("avg_pool", "legit_pool_as_conv"),
        ("wasteful", "legit_drop_dead_code"),
        ("log_scale", "legit_log_scale"),
    ],
)
def test_legitimate_rewrites_pass_beyond_the_draw(problem, candidate):
    result = judge(problem, candidate)
    assert result.accepted, result.reasons
    assert any(n.startswith("inputs beyond the draw:") for n in result.notes), result.notes


def test_moves_where_the_reference_stops_being_finite_are_skipped():
    """exp(32 x) overflows on inputs scaled 4x where the draw does not: that move is skipped (and said)."""
    result = judge("exp_large", "legit_exp_large")
    assert result.accepted, result.reasons
    note = next(n for n in result.notes if n.startswith("inputs beyond the draw:"))
    assert "skipped scaled (the reference's output is not finite there)" in note and "checked signs, special" in note, (
        note
    )


def test_moves_change_only_floating_inputs_and_are_reproducible():
    x, idx = torch.rand(64, 32), torch.arange(5)
    for kind in BEYOND_THE_DRAW:
        a, b = beyond_the_draw([x, idx, 3], kind, 7), beyond_the_draw([x, idx, 3], kind, 7)
        assert torch.equal(a[0], b[0]) and a[1] is idx and a[2] == 3
        assert not torch.equal(a[0], x)
    assert (beyond_the_draw([x], "signs", 7)[0] < 0).any()  # a non-negative draw meets negative values
    assert nonfinite_count([torch.tensor([1.0, float("inf"), float("nan")]), {"s": torch.ones(2)}]) == 2
    with pytest.raises(ValueError, match="for an input transform"):
        beyond_the_draw([x], "bogus", 1)


def test_a_candidate_that_checks_whether_it_is_judged_is_flagged_for_review():
    result = judge("linear_relu", "right_only_when_judged")
    assert result.accepted, result.reasons  # right whenever it is judged
    assert result.needs_review
    flag = next(f for f in result.flags if f.startswith(V.Flag.INSPECTS_CONTEXT))
    assert "sys.argv" in flag and "os.environ" in flag


@pytest.mark.parametrize(
    "source, what",
    [
        ("import os\nx = os.environ['A']", "os.environ"),
        ("from os import environ as e\nx = e.get('A')", "os.environ"),
        ("import os\nx = os.getenv('A')", "os.getenv"),
        ("import sys\nx = sys.argv", "sys.argv"),
        ("import os\nx = os.getppid()", "os.getppid"),
        ("import os\nx = os.getpid()", "os.getpid"),
        ("from pathlib import Path\nx = Path.home() / '.hetforge'", "Path.home"),
        ("x = open('/root/.hetforge/registry.db', 'rb')", "files outside its own folder"),
        ("import os\nx = os.listdir('/tmp')", "files outside its own folder"),
        ("x = open('/proc/self/status').read()", "/proc"),
        ("import glob\nx = glob.glob('/proc/*/cmdline')", "/proc"),
        ("import psutil", "imports psutil"),
        ("from hetforge.optimizer import worker", "imports hetforge.optimizer.worker"),
        ("import sys\nm = sys.modules['__main__']", "sys.modules"),
    ],
)
def test_context_inspection_patterns_are_flagged(source, what):
    flag = context_flag(ast.parse(source))
    assert flag is not None and flag.startswith(V.Flag.INSPECTS_CONTEXT) and what in flag, flag


@pytest.mark.parametrize(
    "source",
    [
        '"""A kernel for /tmp-free hetforge serving."""\nimport torch\nx = torch.relu',  # docstrings do not count
        "from hetforge.optimizer.recipes import recipe_model_class",  # hetforge's recipes and kernels are an API
        "from hetforge.kernels.modules import FusedLinear",
        "import os\nx = os.path.join('a', 'b')",
        # hetforge's own candidates name the problem's path (a temp folder, ~/.hetforge/jobs) for their loader
        "from hetforge.optimizer.recipes import recipe_model_class\n"
        "M = recipe_model_class({'file': '/root/.hetforge/jobs/job-1/p.py'}, {'mode': 'eager'})",
        "M = load('/tmp/pytest-of-root/p.py', '/processing/x')",
    ],
)
def test_ordinary_sources_are_not_flagged(source):
    assert context_flag(ast.parse(source)) is None
    assert not any(f.startswith(V.Flag.INSPECTS_CONTEXT) for f in review_flags(source))
