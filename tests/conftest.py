"""Shared test helpers."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET when kernels are defined (at import): without a GPU, define them for
# the interpreter. They run on CPU tensors only where a test also sets HETFORGE_KERNELS_ON_CPU=1
# (the `triton_on_cpu` fixture); everything else takes the kernels' torch paths, as users' CPUs do.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def run_cli(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """`hetforge ARGS` in a fresh interpreter, as a user runs it."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "hetforge.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=full_env,
    )


@pytest.fixture
def examples() -> Path:
    return EXAMPLES


@pytest.fixture
def triton_on_cpu(monkeypatch) -> str:
    """The device kernel tests run on: CUDA when present, else the CPU under Triton's interpreter."""
    if torch.cuda.is_available():
        return "cuda"
    monkeypatch.setenv("HETFORGE_KERNELS_ON_CPU", "1")
    return "cpu"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(pipeline: str | Path, home: Path, registry: str | None = None, **env: str):
    """`pipeline` served on Ray Serve on a free port, with HETFORGE_HOME=`home` and `env` set for the deployment's
    life: yields its `deploy` record once running; Serve and Ray are shut down and the environment restored after.
    The registry is `registry` (a file or a postgresql:// URL), else `home`/registry.sqlite."""
    keys = ("HETFORGE_HOME", "HETFORGE_RAY_TMP", "PROMETHEUS_MULTIPROC_DIR", *env)
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({"HETFORGE_HOME": str(home), **env})
    from hetforge.serving import deploy as dep

    record = dep.deploy(pipeline, port=free_port(), registry_path=registry or str(home / "registry.sqlite"))
    try:
        dep.wait_until_running(record, timeout_s=600)
        yield record
    finally:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def system_binary(name: str, package: str) -> str:
    """A Debian package's program the serving tests need (scripts/test.sh installs it): fail under CI, else skip."""
    import shutil

    binary = shutil.which(name)
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed: scripts/test.sh installs Debian's {package} package on CI")
        pytest.skip(f"{name} is not installed (apt-get install {package})")
    return binary


class PrometheusServer:
    """A real Prometheus server scraping `targets` (host:port) every second, in a folder of its own."""

    def __init__(self, folder: Path, targets: list[str]):
        folder.mkdir(parents=True, exist_ok=True)
        binary = system_binary("prometheus", "prometheus")
        (folder / "prometheus.yml").write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n  - job_name: hetforge\n    metrics_path: /metrics\n"
            f"    static_configs: [{{targets: [{', '.join(repr(t) for t in targets)}]}}]\n"
        )
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def query(self, expr: str, **params) -> list[dict]:
        import httpx

        path = "query_range" if "start" in params else "query"
        reply = httpx.get(f"{self.url}/api/v1/{path}", params={"query": expr, **params}, timeout=30).json()
        assert reply.get("status") == "success", (expr, reply)
        return reply["data"]["result"]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
