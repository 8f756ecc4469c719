"""Static checks of code references: found where they exist, reported where they do not, nothing executed."""

from __future__ import annotations

import sys
import textwrap

from hetforge.spec.code_refs import check_reference, find_module_source, missing_problem_names, module_names


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def test_names_bound_anywhere_at_module_level_count(tmp_path):
    _write(
        tmp_path / "m.py",
        """
        import os.path
        from torch import nn as tnn
        try:
            from fast import Impl
        except ImportError:
            class Impl: ...
        if True:
            A, (B, C) = 1, (2, 3)
        X: int = 1
        def f(): pass
    """,
    )
    for name in ("os", "tnn", "Impl", "A", "B", "C", "X", "f"):
        assert check_reference(f"m.py:{name}", tmp_path) is None, name
    assert "did you mean" in check_reference("m.py:Imp", tmp_path)


def test_names_inside_functions_do_not_count(tmp_path):
    _write(tmp_path / "m.py", "def f():\n    class Hidden: ...\n")
    assert "it has no 'Hidden'" in check_reference("m.py:Hidden", tmp_path)


def test_dynamic_modules_get_the_benefit_of_the_doubt(tmp_path):
    _write(tmp_path / "star.py", "from os.path import *\n")
    _write(tmp_path / "lazy.py", "import sys\ndef __getattr__(name): ...\n")
    _write(tmp_path / "swap.py", "import sys\nsys.modules[__name__] = object()\n")
    for mod in ("star", "lazy", "swap"):
        assert check_reference(f"{mod}.py:Anything", tmp_path) is None
        assert module_names(str((tmp_path / f"{mod}.py").resolve())).dynamic


def test_packages_are_found_in_the_pipeline_folder_without_running_them(tmp_path):
    marker = tmp_path / "ran"
    _write(tmp_path / "team" / "__init__.py", f"open({str(marker)!r}, 'w')\n")
    _write(tmp_path / "team" / "models.py", f"open({str(marker)!r}, 'w')\nclass Encoder: ...\n")
    assert check_reference("team.models:Encoder", tmp_path) is None
    assert "did you mean" in check_reference("team.models:Encodr", tmp_path)
    assert "team.nothing does not exist" in check_reference("team.nothing:X", tmp_path)
    assert "team.models is a module, not a package" in check_reference("team.models.deeper:X", tmp_path)
    assert not marker.exists()
    assert "team" not in sys.modules


def test_installed_packages_and_compiled_modules(tmp_path):
    assert check_reference("json.decoder:JSONDecoder", tmp_path) is None
    assert find_module_source("math", tmp_path) is None  # built in: nothing to parse, no complaint
    assert check_reference("math:anything", tmp_path) is None


def test_a_file_that_does_not_parse_is_reported(tmp_path):
    _write(tmp_path / "broken.py", "def (:\n")
    assert "syntax error" in check_reference("broken.py:f", tmp_path)
    assert missing_problem_names(tmp_path / "broken.py") == []  # reported at import by plan/serve with the cause


def test_problem_file_names(tmp_path):
    path = _write(tmp_path / "p.py", "class Model: ...\ndef get_inputs(): ...\n")
    assert missing_problem_names(path) == ["get_init_inputs"]
