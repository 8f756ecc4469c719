"""The corpus of broken pipeline files: each gives located messages and exit 1, never a traceback."""

from __future__ import annotations

import random
import re
import time
from pathlib import Path

import pytest

from hetforge.spec import SpecError, load_bytes, load_pipeline
from tests.conftest import run_cli

CORPUS = Path(__file__).resolve().parents[1] / "data" / "bad_pipelines"

# file -> every error it must report: (line, col, a fragment of the message). Exactly these, no more.
EXPECTED: dict[str, list[tuple[int, int, str]]] = {
    "syntax_error.yaml": [(8, 1, 'Got "invalid YAML" for the document: while scanning a quoted scalar')],
    "python_tag.yaml": [(7, 15, 'Got "!!python/object/apply:os.system" for stages[0].callable: a plain YAML value')],
    "python_name_tag.yaml": [(1, 7, 'Got "!!python/name:os.system" for name')],
    "empty.yaml": [(1, 1, 'Got "nothing" for the document')],
    "comments_only.yaml": [(1, 1, 'Got "nothing" for the document')],
    "not_a_mapping.yaml": [(1, 1, 'Got "a list" for the document: a mapping')],
    "multi_document.yaml": [(2, 1, "expected a single document")],
    "duplicate_keys.yaml": [
        (9, 5, 'Got "timeout_s" for stages[0].timeout_s: each key once in a mapping (first at line 8)'),
        (10, 1, 'Got "name" for name: each key once'),
    ],
    "unknown_kind.yaml": [(6, 11, 'Got "lambda" for stages[0].kind: a stage kind: model, llm or tool')],
    "misspelled_fields.yaml": [
        (7, 5, 'Got "calable" for stages[0].calable: not a field of a tool stage; did you mean "callable"?'),
        (11, 5, 'Got "bacthing" for stages[1].bacthing: not a field of a model stage; did you mean "batching"?'),
    ],
    "wrong_types.yaml": [
        (8, 14, 'Got "many" for stages[0].retries: an integer.'),
        (9, 15, 'Got "sometimes" for stages[0].optimize: true or false.'),
        (13, 15, 'Got "a list" for stages[1].sampling: a mapping.'),
    ],
    "out_of_range.yaml": [
        (4, 15, 'Got "-5" for slo.p99_ms: a number greater than 0'),
        (9, 14, 'Got "99" for stages[0].retries: a number of at most 10.'),
        (10, 16, 'Got "0" for stages[0].timeout_s: a number greater than 0'),
        (14, 32, 'Got "0" for stages[1].batching.max_batch_size: a number of at least 1.'),
        (15, 15, "for stages[1].replicas: min_replicas must not exceed max_replicas."),
        (17, 36, 'Got "-3" for stages[1].inputs[0].shape[1]: a size from 1 to 1048576'),
    ],
    "undeclared_cycle.yaml": [(11, 5, 'Got "c -> b" for flow[2]: an edge that closes the cycle b -> c -> b')],
    "dangling_references.yaml": [
        (2, 8, 'Got "start" for entry: the name of a stage (a, b).'),
        (3, 9, 'Got "finish" for output: the name of a stage'),
        (8, 26, 'Got "ghost" for stages[0].agent_loop.tools[0]: the name of a tool stage'),
        (8, 33, 'Got "b" for stages[0].agent_loop.tools[1]: a tool stage; b is a model stage.'),
        (11, 19, 'Got "nowhere" for flow[0].to: the name of a stage'),
    ],
    "duplicate_stage_names.yaml": [(6, 12, 'Got "a" for stages[1].name: stage names must be unique')],
    "unreachable_stage.yaml": [
        (7, 12, 'Got "orphan" for stages[2].name: a stage that a request can reach from the entry (a)')
    ],
    "missing_fields.yaml": [
        (1, 1, 'Got "nothing" for entry: a value is required here.'),
        (1, 1, 'Got "nothing" for output: a value is required here.'),
        (3, 5, 'Got "nothing" for stages[0].name: a value is required here.'),
    ],
    "bad_device.yaml": [
        (5, 58, 'Got "tpu-v9" for stages[0].device: auto, cpu, cuda, a GPU model (H100'),
        (5, 77, 'Got "fp8" for stages[0].precision: one of strict, tf32 or bf16.'),
    ],
    "missing_file.yaml": [(5, 42, 'Got "models/does_not_exist.py" for stages[0].problem_file: an existing file')],
    # Code is parsed, never run: both files raise at import, and a package is looked up without importing it.
    "code_references.yaml": [
        (
            5,
            41,
            "for stages[0].module: a class that code/user_model.py defines; it has no 'TextEncodr'; did you mean \"TextEncoder\"?",
        ),
        (
            6,
            118,
            "for stages[1].preprocess: a function that code/user_model.py defines; it has no 'to_tensor'; did you mean",
        ),
        (
            7,
            45,
            "for stages[2].problem_file: a problem file defining Model, get_inputs, get_init_inputs; it lacks get_inputs.",
        ),
        (
            8,
            40,
            "for stages[3].callable: an importable module; no package 'no_such_package_xyz' in the pipeline's folder",
        ),
        (9, 41, "for stages[4].callable: a function that json.decoder defines; it has no 'no_such_function'"),
    ],
    "bad_condition.yaml": [(8, 28, "for flow[0].when: a condition needs exactly one of `equals` or `one_of`.")],
}

LOCATED = re.compile(r'^(?P<file>.+):(?P<line>\d+):(?P<col>\d+): Got ".*" for .+: .+[.?]$')


def test_corpus_is_complete():
    assert sorted(p.name for p in CORPUS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_corpus_file_reports_every_error_located(name):
    with pytest.raises(SpecError) as info:
        load_pipeline(CORPUS / name)
    got = [(d.line, d.col, d.message) for d in info.value.diagnostics]
    assert len(got) == len(EXPECTED[name]), got
    for (line, col, fragment), (gline, gcol, message) in zip(EXPECTED[name], got):
        assert (gline, gcol) == (line, col), (message, fragment)
        assert fragment in message
    for diagnostic in info.value.diagnostics:
        assert LOCATED.match(str(diagnostic)), str(diagnostic)
        assert diagnostic.file == str(CORPUS / name)


def test_python_tags_execute_nothing(tmp_path):
    marker = tmp_path / "pwned"
    doc = f'name: !!python/object/apply:os.system ["touch {marker}"]\nentry: a\noutput: a\nstages: []\n'
    with pytest.raises(SpecError):
        load_bytes(doc.encode())
    assert not marker.exists()


def _generated() -> dict[str, bytes]:
    laughs = 'a: &a ["x","x","x","x","x","x","x","x","x"]\n' + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]\n" for i in range(8)
    )
    return {
        "alias_bomb": laughs.encode(),
        "deep_nesting": b"name: " + b"[" * 5000 + b"]" * 5000 + b"\n",
        "recursive_alias": b"name: &a [*a]\n",
        "binary_garbage": bytes(random.Random(0).randrange(256) for _ in range(4096)),
        "nul_byte": b"name: a\x00b\n",
        "huge_file": b"name: x\n" + b"# padding\n" * 200_000,
    }


EXPECTED_GENERATED = {
    "alias_bomb": (1, 12, "more than 100000 values"),
    "deep_nesting": (1, 38, "nesting 33 levels deep"),
    "recursive_alias": (1, 7, "no recursive aliases"),
    "binary_garbage": (1, 1, 'Got "byte 0xc5" for the document: UTF-8 text'),
    "nul_byte": (1, 8, 'Got "U+0000" for the document: printable UTF-8 text'),
    "huge_file": (1, 1, "more than 1048576 bytes"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_GENERATED))
def test_generated_nasties_fail_fast_and_located(tmp_path, name):
    path = tmp_path / f"{name}.yaml"
    path.write_bytes(_generated()[name])
    start = time.perf_counter()
    with pytest.raises(SpecError) as info:
        load_pipeline(path)
    elapsed = time.perf_counter() - start
    [diagnostic] = info.value.diagnostics
    line, col, fragment = EXPECTED_GENERATED[name]
    assert (diagnostic.line, diagnostic.col) == (line, col)
    assert fragment in diagnostic.message
    # Not a timing assertion about speed: a guard that a bomb was refused rather than expanded.
    assert elapsed < 30


def test_cli_rejects_whole_corpus_with_exit_1_and_no_traceback():
    files = sorted(str(p) for p in CORPUS.glob("*.yaml"))
    result = run_cli("validate", *files)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line]
    assert len(lines) == sum(len(v) for v in EXPECTED.values())
    assert all(LOCATED.match(line) for line in lines), lines
    assert result.stdout == ""


def test_cli_io_errors_exit_2(tmp_path):
    missing = run_cli("validate", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    directory = run_cli("validate", str(tmp_path))
    assert directory.returncode == 2
    usage = run_cli("validate")
    assert usage.returncode == 2
    assert "Traceback" not in missing.stderr + directory.stderr + usage.stderr
