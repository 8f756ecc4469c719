"""Every command's --registry takes an SQLite file path or a postgresql:// URL, the same way.

The commands that take it: `approvals ...`, `registry ...` and `kernels ...`. Each is run here on
both backends (the PostgreSQL one is a database of the tests' server, `tests/postgres.py`); a URL of
another scheme is a usage error, never a file of that name.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from hetforge.cli import app
from hetforge.kernels.registry import Registry
from hetforge.serving.jobs import JobBoard
from tests.conftest import REPO
from tests.postgres import pg_server  # noqa: F401 - the fixture

PIPELINE = REPO / "tests" / "data" / "reoptimize" / "pipeline.yaml"
ACCEPTED = {"verdict": "accepted", "needs_review": False, "reference_ms": 2.0, "candidate_ms": 1.0, "speedup": 2.0}


@pytest.fixture(params=["sqlite", "postgresql"])
def registry(request, tmp_path, monkeypatch) -> str:
    """The --registry value: a file path or a URL; the default location points elsewhere, so only the option counts."""
    monkeypatch.setenv("HETFORGE_HOME", str(tmp_path / "elsewhere"))
    monkeypatch.delenv("HETFORGE_STATE_URL", raising=False)
    if request.param == "sqlite":
        return str(tmp_path / "state" / "registry.sqlite")
    return request.getfixturevalue("pg_server").new_database()


def _cli(*args: str):
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def _pending_variant(location: str) -> int:
    """A variant a job of reopt-test found, waiting for approval (as `approvals list` shows them)."""
    variant = Registry(location).add(
        fingerprint="fp",
        device_class="cpu",
        precision="strict",
        name="found",
        agent="test",
        source="# found\n",
        verdict=ACCEPTED,
        recipe={},
        signature={},
        status="pending_review",
    )
    jobs = JobBoard(location)
    job = jobs.queue("reopt-test", "score", "hot", "busy", [])
    jobs.claim(job.id)
    jobs.finish(job.id, "done", variant.id, {"winner": "found"})
    return variant.id


def test_each_command_reads_and_writes_the_registry_it_is_given(registry):
    variant_id = _pending_variant(registry)
    code, out = _cli("registry", "check", "--registry", registry, "--json")
    assert code == 0, out
    doc = json.loads(out.strip().splitlines()[-1])
    assert doc["backend"] == ("postgresql" if registry.startswith("postgresql://") else "sqlite")
    assert doc["rows"]["variants"] == 1 and doc["rows"]["jobs"] == 1
    code, out = _cli("kernels", "list", "--registry", registry, "--json")
    assert code == 0 and [v["id"] for v in json.loads(out.strip().splitlines()[-1])] == [variant_id], out
    code, out = _cli("approvals", "list", str(PIPELINE), "--registry", registry, "--json")
    assert code == 0 and [r["variant_id"] for r in json.loads(out.strip().splitlines()[-1])] == [variant_id], out
    code, out = _cli("approvals", "approve", str(PIPELINE), str(variant_id), "--by", "alice", "--registry", registry)
    assert code == 0, out
    assert Registry(registry).get(variant_id).status == "canary"  # the controller rolls it out next
    code, out = _cli("kernels", "reject", str(variant_id), "--by", "bob", "--registry", registry)
    assert code == 0, out
    assert (Registry(registry).get(variant_id).status, Registry(registry).get(variant_id).approver) == (
        "rejected",
        "bob",
    )
    code, out = _cli("kernels", "show", str(variant_id), "--registry", registry)
    assert code == 0 and "# found" in out, out


def test_postgres_scheme_spellings_reach_the_same_database(pg_server):  # noqa: F811 - the fixture imported above
    url = pg_server.new_database()
    variant_id = _pending_variant(url)
    for spelling in (
        url.replace("postgresql://", "postgres://"),
        url.replace("postgresql://", "postgresql+psycopg://"),
    ):
        code, out = _cli("kernels", "list", "--registry", spelling, "--json")
        assert code == 0 and [v["id"] for v in json.loads(out.strip().splitlines()[-1])] == [variant_id], (
            spelling,
            out,
        )


@pytest.mark.parametrize("command", [("registry", "check"), ("kernels", "list"), ("approvals", "list", str(PIPELINE))])
def test_another_url_scheme_is_a_usage_error_not_a_file(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out = _cli(*command, "--registry", "mysql://db/hetforge")
    assert code == 2, out
    assert "mysql://db/hetforge" in out and "postgresql://" in out, out
    assert list(tmp_path.iterdir()) == []  # no SQLite file named mysql:/db/hetforge


def test_a_state_url_of_another_scheme_in_the_environment_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("HETFORGE_STATE_URL", "mysql://db/hetforge")
    from hetforge import state

    with pytest.raises(state.StoreError, match='Got "mysql://db/hetforge" for HETFORGE_STATE_URL'):
        state.location_of(None)
