"""Beyond one machine: a local multi-node Ray cluster started with `ray start` (a head and two workers
declaring different device classes through the `cpu_class:<name>` resource), the pipeline deployed
on it with `hetforge serve --address`, each stage landing on a node of the class the planner placed it
on, and a background optimization job running on the node that has the stage's device class.

The state is on PostgreSQL, as a cluster's is (`docs/state.md`): a database of the tests' server
(`tests/postgres.py`), its URL in $HETFORGE_STATE_URL of every node and of the CLI; no SQLite file
is made. The nodes share this machine (and so the metrics folder and the database's host): what is
checked is where Ray puts each replica and task, which is what the planner's Ray options decide,
and that the replicas and the job on the worker nodes read and write the one database. It does
not show behaviour across real hosts (network partitions, clock skew). `ray start` turns Ray
2.60's token authentication on, so every client here runs with RAY_AUTH_MODE=token (the token is in
~/.ray/auth_token), as a user's would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")
pytest.importorskip("psycopg")

from tests.conftest import REPO, free_port  # noqa: E402
from tests.postgres import pg_server  # noqa: E402,F401 - the fixture

PIPELINE = REPO / "tests" / "data" / "multinode" / "pipeline.yaml"
RAY = str(REPO / ".venv" / "bin" / "ray") if (REPO / ".venv" / "bin" / "ray").exists() else "ray"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
ENV = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}


class RayNode:
    """One `ray start --block` node in a session of its own, so that stopping it stops its raylet and workers."""

    def __init__(self, args: list[str], log, worker_ports: int, env: dict):
        ports = [
            "--node-manager-port",
            "--object-manager-port",
            "--metrics-export-port",
            "--dashboard-agent-listen-port",
            "--dashboard-agent-grpc-port",
            "--runtime-env-agent-port",
        ]
        # ports of their own: nodes on one host would otherwise collide (the workers' range too)
        cmd = [
            RAY,
            "start",
            "--block",
            "--disable-usage-stats",
            f"--min-worker-port={worker_ports}",
            f"--max-worker-port={worker_ports + 999}",
            *args,
        ]
        cmd += [f"{flag}={free_port()}" for flag in ports]
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


def _nodes(address: str) -> list[dict]:
    """The cluster's alive nodes, asked from a separate process (this one stays out of Ray)."""
    code = (
        f"import json, ray; ray.init(address={address!r}, logging_level='ERROR', log_to_driver=False); "
        "print(json.dumps([{'id': n['NodeID'], 'resources': n['Resources']} for n in ray.nodes() if n['Alive']]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=ENV)
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else []


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, pg_server):  # noqa: F811 - the fixture imported above
    folder = tmp_path_factory.mktemp("multinode")
    state_url = pg_server.new_database()
    env = {**ENV, "HETFORGE_STATE_URL": state_url}  # every node's, as a cluster's configuration sets it
    log = open(folder / "ray.log", "w")
    port = free_port()
    address = f"127.0.0.1:{port}"
    temp = f"/tmp/hf-mn-{os.getpid()}"
    if not os.environ.get("RAY_AUTH_TOKEN") and not Path("~/.ray/auth_token").expanduser().is_file():
        # a fresh machine has no token yet, and `ray start` with token auth does not make one
        subprocess.run([RAY, "get-auth-token", "--generate"], env=ENV, capture_output=True, timeout=120, check=True)
    nodes = [
        RayNode(
            [
                "--head",
                f"--port={port}",
                "--num-cpus=1",
                "--include-dashboard=false",
                f"--temp-dir={temp}",
                f"--ray-client-server-port={free_port()}",
            ],
            log,
            20000,
            env,
        )
    ]
    try:
        deadline = time.monotonic() + 120
        while not _nodes(address):
            assert time.monotonic() < deadline, (folder / "ray.log").read_text()[-3000:]
            time.sleep(2)
        for i, name in enumerate(("cpu-a", "cpu-b")):  # one at a time: two raylets starting at once time out here
            nodes.append(
                RayNode(
                    ["--address", address, "--num-cpus=2", f"--resources={json.dumps({f'cpu_class:{name}': 1000})}"],
                    log,
                    21000 + 1000 * i,
                    env,
                )
            )
            while len(found := _nodes(address)) < 2 + i:
                assert time.monotonic() < deadline + 120, (folder / "ray.log").read_text()[-3000:]
                time.sleep(2)
        by_class = {"head": next(n["id"] for n in found if not any(k.startswith("cpu_class:") for k in n["resources"]))}
        for name in ("cpu-a", "cpu-b"):
            by_class[name] = next(n["id"] for n in found if f"cpu_class:{name}" in n["resources"])
        yield {"address": address, "nodes": by_class, "home": folder / "home", "state_url": state_url}
    finally:
        for node in reversed(nodes):
            node.stop()
        log.close()


def _cli(*args: str, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hetforge.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
    )


def test_stages_land_on_their_device_class_nodes_and_jobs_on_the_target_device_node(cluster):
    env = {**ENV, "HETFORGE_HOME": str(cluster["home"]), "HETFORGE_STATE_URL": cluster["state_url"]}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    plan = _cli("plan", str(PIPELINE), "--ray-address", cluster["address"], "--json", env=env, timeout=300)
    assert plan.returncode == 0, plan.stderr[-3000:]
    planned = json.loads(plan.stdout.strip().splitlines()[-1])["stages"]
    assert planned["score"]["device"] == "cpu-b" and planned["prepare"]["device"] == "cpu-a", planned
    assert planned["score"]["ray_actor_options"]["resources"] == {"cpu_class:cpu-b": 0.001}
    assert set(json.loads(plan.stdout.strip().splitlines()[-1])["inventory"]["classes"]) == {"cpu-a", "cpu-b"}

    port = free_port()
    served = _cli("serve", str(PIPELINE), "--address", cluster["address"], "--port", str(port), env=env)
    assert served.returncode == 0, served.stdout[-2000:] + served.stderr[-3000:]
    url = f"http://127.0.0.1:{port}"
    try:
        for i in range(5):
            reply = httpx.post(
                f"{url}/v1/pipelines/multinode-test/run", json={"input": {"x": [[0.1 * i] * 16]}}, timeout=60
            )
            assert reply.status_code == 200, reply.text
            assert set(reply.json()["output"]["scores"]) == {"a", "b", "c", "d"}
        stages = httpx.get(f"{url}/v1/pipelines/multinode-test/status", timeout=30).json()["stages"]
        nodes = cluster["nodes"]
        assert stages["prepare"]["node_id"] == nodes["cpu-a"], (stages, nodes)
        assert stages["score"]["node_id"] == nodes["cpu-b"], (stages, nodes)
        assert stages["score"]["device_class"] == "cpu-b"

        queued = httpx.post(
            f"{url}/v1/pipelines/multinode-test/stages/score/optimize",
            json={"hint": "drop dead code"},
            # the API token `hetforge serve` generated under the cluster's HETFORGE_HOME
            headers={"Authorization": "Bearer " + (cluster["home"] / "api-token").read_text().strip()},
            timeout=60,
        )
        assert queued.status_code == 202, queued.text
        job_id = queued.json()["queued"]["id"]
        from hetforge.serving.jobs import JobBoard

        board = JobBoard(cluster["state_url"])
        deadline = time.monotonic() + 400
        while board.get(job_id).state not in ("done", "failed"):
            assert time.monotonic() < deadline, board.get(job_id)
            time.sleep(2)
        job = board.get(job_id)
        assert job.state == "done", job
        assert job.summary["node_id"] == nodes["cpu-b"], (
            job.summary.get("node_id"),
            nodes,
        )  # where score's device class is
        assert job.summary["winner"], job.summary
        from hetforge.kernels.registry import Registry
        from hetforge.serving.swap_control import SwapBoard

        if job.variant_id is not None:  # registered from the cpu-b node, into the one database
            assert Registry(cluster["state_url"]).get(job.variant_id).device_class == "cpu-b"
        # the score replica on the cpu-b node heartbeats into the database (within the last 10 s, as `alive` counts)
        assert SwapBoard(cluster["state_url"]).alive("multinode-test", "score"), "no heartbeat from score's replica"
        assert not (cluster["home"] / "registry.sqlite").exists()  # nothing went to a local file
    finally:
        down = _cli("down", "multinode-test", env=env, timeout=120)
        assert down.returncode == 0, down.stderr[-2000:]
