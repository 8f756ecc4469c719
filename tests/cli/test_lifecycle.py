"""The deployment lifecycle without a Ray instance: what `status`, `down`, `logs` and `approvals` do with a
deployment record whose processes are gone, or whose PID now belongs to another program, and which stages a
changed YAML redeploys (`versions_of`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from hetforge.serving import deploy, ray_instance
from hetforge.spec import load_pipeline
from tests.conftest import free_port, run_cli

PIPELINE = """\
name: life
entry: first
output: second
stages:
  - name: first
    kind: tool
    callable: first.py:first
    args: {x: request.x}
    replicas: 2
  - name: second
    kind: tool
    callable: second.py:second
    args: {first: first}
flow:
  - {from: first, to: second}
"""


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HETFORGE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _files(folder):
    (folder / "first.py").write_text("def first(x):\n    return {'x': x}\n")
    (folder / "second.py").write_text("def second(first):\n    return first\n")
    (folder / "life.yaml").write_text(PIPELINE)
    return folder / "life.yaml"


def _record(folder, pid: int, started: int, session_dir: str = "", processes: dict | None = None):
    path = _files(folder)
    record = deploy.Deployment(
        "life",
        str(path),
        f"http://127.0.0.1:{free_port()}",
        "127.0.0.1:1",
        str(folder / "metrics"),
        str(folder / "registry.sqlite"),
        pid,
        True,
        {"first": {"device_class": "cpu"}, "second": {"device_class": "cpu"}},
        started=started,
        session_dir=session_dir,
        ray_processes=processes or {},
    )
    record.save()
    return record


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def test_a_process_is_the_recorded_one_only_with_its_start_time_and_command_line():
    me = os.getpid()
    started = ray_instance.start_ticks(me)
    assert started is not None
    assert ray_instance.is_same_process(me, started, ())
    assert not ray_instance.is_same_process(me, started + 1, ())  # a reused PID has another start time
    assert not ray_instance.is_same_process(me, started, ("hetforge-serve-not-in-this-command-line",))
    child = _sleeper()
    try:
        assert child.pid in ray_instance.descendants(me)
    finally:
        child.kill()
        child.wait()


def test_status_exits_non_zero_when_the_deployment_is_unreachable(tmp_path, home):
    _record(tmp_path, pid=2**22 + 7, started=1)
    out = run_cli("status", env={"HETFORGE_HOME": str(home)})
    assert out.returncode == 1, out.stdout + out.stderr
    assert "unreachable" in out.stdout
    doc = json.loads(run_cli("status", "life", "--json", env={"HETFORGE_HOME": str(home)}).stdout.splitlines()[-1])
    assert doc["deployments"][0]["reachable"] is False
    assert run_cli("status", "other", env={"HETFORGE_HOME": str(home)}).returncode == 1  # nothing recorded for it


def test_down_never_signals_a_pid_that_is_no_longer_the_serve_process(tmp_path, home):
    impostor = _sleeper()  # another program: its command line is not `hetforge serve`
    try:
        started = ray_instance.start_ticks(impostor.pid)
        _record(tmp_path, pid=impostor.pid, started=started)
        [(_, what)] = deploy.down("life")
        assert what.startswith(f"process {impostor.pid} is not a `hetforge serve` command line (not signalled")
        _record(tmp_path, pid=impostor.pid, started=started - 1)  # the PID reused since: another start time
        assert deploy.down("life") == [("life", f"serve process {impostor.pid} was already gone (not signalled)")]
        time.sleep(0.5)
        assert impostor.poll() is None
        assert not deploy.state_path("life").exists()
    finally:
        impostor.kill()
        impostor.wait()


def test_down_ends_what_a_killed_serve_process_left_behind(tmp_path, home):
    orphans = [_sleeper(), _sleeper()]  # stand-ins for Ray's agents after a SIGKILL of the serve process
    bystander = _sleeper()  # not recorded: left alone
    try:
        processes = {str(p.pid): ray_instance.start_ticks(p.pid) for p in orphans}
        processes[str(bystander.pid)] = ray_instance.start_ticks(bystander.pid) + 1  # its PID, another start time
        _record(tmp_path, pid=2**22 + 7, started=1, processes=processes)
        [(name, what)] = deploy.down("life")
        assert name == "life" and "2 leftover Ray process(es)" in what, what
        for p in orphans:
            assert p.wait(timeout=30) != 0
        assert bystander.poll() is None
    finally:
        for p in (*orphans, bystander):
            p.kill()
            p.wait()


def test_logs_reads_the_replicas_files_in_rays_log_folder(tmp_path, home):
    session = tmp_path / "session_x"
    (session / "logs" / "serve").mkdir(parents=True)
    (session / "logs" / "serve" / "replica_life_stage-first_abc.log").write_text("one\ntwo\n")
    (session / "logs" / "serve" / "replica_life_stage-second_def.log").write_text("three\n")
    (session / "logs" / "serve" / "replica_other_stage-first_ghi.log").write_text("not ours\n")
    _record(tmp_path, pid=2**22 + 7, started=1, session_dir=str(session))
    env = {"HETFORGE_HOME": str(home)}
    out = run_cli("logs", "life", "--stage", "first", env=env)
    assert out.returncode == 0 and out.stdout.splitlines()[1:] == ["one", "two"], out.stdout + out.stderr
    both = run_cli("logs", "life", "--lines", "1", env=env).stdout
    assert "two" in both and "three" in both and "one" not in both and "not ours" not in both
    missing = run_cli("logs", "life", "--stage", "nope", env=env)
    assert missing.returncode == 1 and "has no stage 'nope'" in missing.stderr


def test_approvals_take_the_pipeline_name_or_its_file(tmp_path, home):
    record = _record(tmp_path, pid=2**22 + 7, started=1)
    registry = ["--registry", str(tmp_path / "registry.sqlite")]
    env = {"HETFORGE_HOME": str(home)}
    by_name = run_cli("approvals", "list", "life", *registry, "--json", env=env)
    by_file = run_cli("approvals", "list", record.pipeline_file, *registry, "--json", env=env)
    assert by_name.returncode == by_file.returncode == 0, by_name.stderr + by_file.stderr
    assert json.loads(by_name.stdout.splitlines()[-1]) == json.loads(by_file.stdout.splitlines()[-1]) == []
    unknown = run_cli("approvals", "list", "nobody", *registry, env=env)
    assert unknown.returncode == 1 and "no deployment of a pipeline named 'nobody'" in unknown.stderr


def test_only_the_stage_whose_code_or_fields_changed_gets_a_new_version(tmp_path):
    path = _files(tmp_path)
    placement = {"first": {"device": "cpu"}, "second": {"device": "cpu"}}

    def versions():
        return deploy.versions_of(load_pipeline(path), tmp_path, placement, "r.sqlite", "m")

    before = versions()
    (tmp_path / "second.py").write_text("def second(first):\n    return {'changed': first}\n")
    after = versions()
    assert after["stage-first"] == before["stage-first"]
    assert after["stage-second"] != before["stage-second"]
    assert after["PipelineIngress"] == before["PipelineIngress"]  # the pipeline document did not change
    path.write_text(PIPELINE.replace("replicas: 2", "replicas: 3"))
    scaled = versions()
    assert scaled["stage-first"] == after["stage-first"]  # a replica count scales; it restarts nothing
    assert scaled["PipelineIngress"] != after["PipelineIngress"]


def test_an_exited_process_not_yet_collected_by_its_parent_counts_as_gone():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    started = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until it has exited; it stays a zombie: nobody waits for it yet
        stat = (ray_instance.PROC / str(child.pid) / "stat").read_text()
        if stat[stat.rindex(")") + 2] == "Z":
            break
        started = ray_instance.start_ticks(child.pid)
        time.sleep(0.1)
    assert ray_instance.start_ticks(child.pid) is None
    assert started is None or not ray_instance.is_same_process(child.pid, started, ())
    child.wait()
