"""A user's mistakes in the code a pipeline names, reported where they are made, as the CLI prints them:
`validate` reads constructors without running them; `plan` imports the functions a stage names first and
prints one line naming the stage, its YAML line and the cause, never a traceback."""

from __future__ import annotations

import textwrap

import pytest

from hetforge.spec.code_refs import check_constructor
from tests.conftest import run_cli

HEAD = """
import torch.nn as nn


class Head(nn.Module):
    def __init__(self, d_in: int, hidden: int, *, scale: float = 1.0):
        super().__init__()
        self.fc = nn.Linear(d_in, hidden)

    def forward(self, x):
        return self.fc(x)


class Loose(nn.Module):
    def __init__(self, *args, **kwargs):
        super().__init__()


class Inherits(Head):
    pass


def to_tensor(x):
    return x
"""


def _pipeline(folder, stage_lines: str, name: str = "p.yaml"):
    (folder / "models").mkdir(exist_ok=True)
    (folder / "models" / "head.py").write_text(HEAD)
    text = (
        "name: mistakes\nentry: classify\noutput: classify\nstages:\n"
        "  - name: classify\n    kind: model\n    inputs:\n      - {name: x, shape: [batch, 16], dtype: float32}\n"
        + textwrap.indent(textwrap.dedent(stage_lines), "    ")
    )
    path = folder / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("args", "kwargs", "expected"),
    [
        (None, {"d_in": 16, "hidden": 4}, None),
        ([16, 4], {}, None),
        ([16], {"hidden": 4, "scale": 2.0}, None),
        (None, {"d_in": 16}, "'hidden' missing"),
        (None, {"d_in": 16, "hiden": 4}, "no parameter 'hiden'; did you mean \"hidden\"?"),
        ([1, 2, 3], {}, "takes 2 positional argument(s), not 3"),
    ],
)
def test_constructor_arguments_are_checked_against_the_parsed_init(tmp_path, args, kwargs, expected):
    _pipeline(tmp_path, "module: models/head.py:Head\n")
    why = check_constructor("models/head.py:Head", tmp_path, args, kwargs)
    assert (why is None) if expected is None else (expected in why), why


def test_constructors_that_cannot_be_read_statically_get_the_benefit_of_the_doubt(tmp_path):
    _pipeline(tmp_path, "module: models/head.py:Head\n")
    assert check_constructor("models/head.py:Loose", tmp_path, [1, 2, 3], {"anything": 1}) is None
    assert check_constructor("models/head.py:Inherits", tmp_path, None, {}) is None  # its __init__ is Head's
    assert check_constructor("json.decoder:JSONDecoder", tmp_path, None, {"no_such": 1}) is not None


def test_validate_names_the_missing_constructor_argument_at_its_line(tmp_path):
    path = _pipeline(tmp_path, "module: models/head.py:Head\ninit_kwargs: {d_in: 16}\n")
    out = run_cli("validate", str(path))
    assert out.returncode == 1
    assert out.stderr.strip() == (
        f'{path}:10:18: Got "{{"d_in": 16}}" for stages[0].init_kwargs: arguments Head.__init__ needs; '
        "'hidden' missing."
    )


@pytest.mark.slow
def test_plan_reports_a_preprocess_whose_import_fails_in_one_line(tmp_path):
    path = _pipeline(
        tmp_path,
        "module: models/head.py:Head\ninit_kwargs: {d_in: 16, hidden: 4}\npreprocess: models/bad.py:to_tensor\n",
    )
    (tmp_path / "models" / "bad.py").write_text("import no_such_dependency_xyz\n\ndef to_tensor(x):\n    return x\n")
    assert run_cli("validate", str(path)).returncode == 0  # the name is defined: only running the import fails
    out = run_cli("plan", str(path), env={"HETFORGE_HOME": str(tmp_path / "home")}, timeout=300)
    assert out.returncode == 1
    assert out.stderr.strip() == (
        f"{path}:5: stage \"classify\": ModuleNotFoundError: No module named 'no_such_dependency_xyz'"
    )
    assert "Traceback" not in out.stdout + out.stderr
