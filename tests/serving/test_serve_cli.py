"""`hetforge serve | status | down` as a user runs them: the embedded default (Ray started by the
serve process), a request, the status table, and `down` ending the serve process cleanly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO

pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_serve_status_down_lifecycle(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HETFORGE_HOME": str(tmp_path), "HETFORGE_RAY_TMP": f"/tmp/hf-cli-{os.getpid()}"}
    cli = [sys.executable, "-m", "hetforge.cli"]
    serve = subprocess.Popen(
        [*cli, "serve", "tests/data/serving/tools_only.yaml", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert serve.poll() is None, serve.stdout.read()
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        reply = httpx.post(f"{url}/v1/pipelines/tools-only/run", json={"input": {"x": [[1.0]]}}, timeout=30)
        assert reply.status_code == 200 and reply.json()["output"] == {"x": [[1.0]]}
        status = subprocess.run(
            [*cli, "status", "--json"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
        )
        doc = json.loads(status.stdout.strip().splitlines()[-1])["deployments"]
        assert [d["pipeline"] for d in doc] == ["tools-only"] and doc[0]["state"] == "RUNNING"
        assert doc[0]["stages"]["prepare"]["device"] == "cpu" and doc[0]["embedded"]
        down = subprocess.run([*cli, "down"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert down.returncode == 0 and "stopped: tools-only" in down.stdout
        assert serve.wait(timeout=120) == 0  # the serve process shut Serve and Ray down and exited
        assert "stopped tools-only" in serve.stdout.read()
        assert not (tmp_path / "serve" / "tools-only.json").exists()
        gone = subprocess.run([*cli, "status"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert "no deployment recorded" in gone.stdout
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
