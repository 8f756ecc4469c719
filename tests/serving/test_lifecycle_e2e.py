"""One deployment per pipeline on real Ray Serve, as a user drives it with the CLI: a second `serve` of the same
pipeline refuses (naming the running one), a busy port is one line, `status` lists every replica, `reload`
redeploys only the changed stage while requests keep being answered, `logs` reads the replica's file, and after a
SIGKILL of the serve process `status` exits 1 and `down` leaves no process of that Ray instance."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from hetforge.serving import ray_instance
from tests.conftest import REPO, free_port

pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PIPELINE = """\
name: {name}
entry: first
output: second
stages:
  - name: first
    kind: tool
    callable: first.py:first
    args: {{x: request.x}}
    replicas: 2
  - name: second
    kind: tool
    callable: second.py:second
    args: {{first: first}}
    placement: separate  # a replica of its own, whose redeploy this test watches (auto would run it inline)
flow:
  - {{from: first, to: second}}
"""


def test_one_deployment_per_pipeline_reload_status_logs_and_a_killed_serve(tmp_path):
    (tmp_path / "first.py").write_text("def first(x):\n    return {'x': x}\n")
    (tmp_path / "second.py").write_text("def second(first):\n    return {'x': first['x'], 'version': 1}\n")
    (tmp_path / "life.yaml").write_text(PIPELINE.format(name="life"))
    (tmp_path / "other.yaml").write_text(PIPELINE.format(name="other"))
    port = free_port()
    env = {
        **os.environ,
        "HETFORGE_HOME": str(tmp_path / "home"),
        "HETFORGE_RAY_TMP": f"/tmp/hf-life-{os.getpid()}",
        "PYTHONPATH": str(REPO),
    }

    def cli(*args, timeout=300):
        return subprocess.run(
            [sys.executable, "-m", "hetforge.cli", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def status() -> tuple[int, dict]:
        out = cli("status", "life", "--json")
        return out.returncode, json.loads(out.stdout.strip().splitlines()[-1])["deployments"][0]

    serve = subprocess.Popen(
        [sys.executable, "-m", "hetforge.cli", "serve", "life.yaml", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/v1/pipelines/life/run"
    record_file = tmp_path / "home" / "serve" / "life.json"
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            assert serve.poll() is None, serve.stdout.read()
            try:
                if httpx.post(url, json={"input": {"x": 1}}, timeout=5).status_code == 200 and record_file.exists():
                    if json.loads(record_file.read_text())["ray_processes"]:
                        break
            except httpx.HTTPError:
                pass
            time.sleep(1)

        again = cli("serve", "life.yaml", "--port", str(free_port()))
        assert again.returncode == 1
        assert again.stderr.strip() == (
            f"error: life is already served at http://127.0.0.1:{port} by `hetforge serve` (pid {serve.pid}); "
            "`hetforge reload life.yaml` updates it in place, `hetforge down life` stops it"
        )
        busy = cli("serve", "other.yaml", "--port", str(port))
        assert busy.returncode == 1
        assert busy.stderr.strip() == (
            f"error: 127.0.0.1:{port} is already in use by the deployment of life (hetforge status); "
            "pass --port with a free port"
        )

        code, before = status()
        assert code == 0 and before["reachable"]
        assert [r["state"] for r in before["stages"]["first"]["replicas"]] == ["RUNNING", "RUNNING"]
        assert len(before["stages"]["second"]["replicas"]) == 1

        answers: list[int | str] = []
        stop = threading.Event()

        def client():
            with httpx.Client(timeout=60) as http:
                while not stop.is_set():
                    try:
                        reply = http.post(url, json={"input": {"x": 2}})
                        answers.append(reply.json()["output"]["version"] if reply.status_code == 200 else "failed")
                    except httpx.HTTPError as err:
                        answers.append(f"lost: {err}")

        threads = [threading.Thread(target=client) for _ in range(2)]
        for t in threads:
            t.start()
        (tmp_path / "second.py").write_text("def second(first):\n    return {'x': first['x'], 'version': 2}\n")
        reload = cli("reload", "life.yaml")
        time.sleep(3)
        stop.set()
        for t in threads:
            t.join(timeout=120)
        assert reload.returncode == 0, reload.stdout + reload.stderr
        assert "redeployed: stage-second" in reload.stdout and "kept: PipelineIngress, stage-first" in reload.stdout
        assert [a for a in answers if a not in (1, 2)] == []  # every request during the update was answered
        assert answers[-1] == 2 and 1 in answers

        code, after = status()
        assert code == 0
        ids = {
            (when, stage): sorted(r["replica"] for r in doc["stages"][stage]["replicas"])
            for when, doc in (("before", before), ("after", after))
            for stage in ("first", "second")
        }
        assert ids[("after", "first")] == ids[("before", "first")]  # unchanged: the same replicas
        assert ids[("after", "second")] != ids[("before", "second")]

        logs = cli("logs", "life", "--stage", "second", "--lines", "5")
        assert logs.returncode == 0 and "replica_life_stage-second_" in logs.stdout

        record = json.loads(record_file.read_text())
        os.kill(serve.pid, signal.SIGKILL)
        serve.wait(timeout=30)
        time.sleep(3)
        code, dead = status()
        assert code == 1 and not dead["reachable"]
        down = cli("down", "life")
        assert down.returncode == 0 and "stopped: life" in down.stdout
        survivors = [int(p) for p, t in record["ray_processes"].items() if ray_instance.start_ticks(int(p)) == t]
        assert survivors == [] and ray_instance.instance_pids(record["session_dir"]) == []
        assert not record_file.exists()
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
        cli("down", timeout=120)
