"""The cost of one Ray Serve hop on this machine, for the planner's tool placement (`planners/tool_hops.py`).

A `Caller` replica (standing for the ingress) calls an `Echo` replica (standing for a tool stage)
through a deployment handle with a small JSON-like payload, `samples` times one after the other, and
the same echo in its own process; the hop is the difference of the medians. Measured inside a replica
because that is where the ingress makes its tool calls. It starts a Ray instance of its own (in a
temp folder, no HTTP proxy) and shuts it down; about 20 s on a 2-core machine.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import ray
from ray import serve

from hetforge.planners.tool_hops import save_hop_cost

PAYLOAD = {"order_id": "1234", "note": "x" * 200}  # an agent tool call's arguments: a few hundred bytes


def _echo(payload: dict) -> dict:
    return {"echo": payload}


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
class Echo:
    async def __call__(self, payload: dict) -> dict:
        return _echo(payload)


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
class Caller:
    def __init__(self, echo):
        self.echo = echo

    async def measure(self, samples: int) -> dict:
        for _ in range(10):  # warm-up: the router learns the replica, connections open
            await self.echo.remote(PAYLOAD)
        remote, local = [], []
        for _ in range(samples):
            start = time.perf_counter()
            await self.echo.remote(PAYLOAD)
            remote.append((time.perf_counter() - start) * 1e3)
            start = time.perf_counter()
            await asyncio.sleep(0)  # an inline call still yields to the loop once
            _echo(PAYLOAD)
            local.append((time.perf_counter() - start) * 1e3)
        return {"remote_ms": statistics.median(remote), "local_ms": statistics.median(local)}


def measure(samples: int = 200) -> dict:
    """{"hop_ms", "remote_ms", "local_ms", "samples"}: medians in ms, on a Ray instance started here."""
    temp = Path(tempfile.mkdtemp(prefix="hf-hop-", dir="/tmp"))
    ray.init(num_cpus=max(2, os.cpu_count() or 1), include_dashboard=False, _temp_dir=str(temp), log_to_driver=False)
    try:
        serve.start(proxy_location="Disabled")
        handle = serve.run(Caller.bind(Echo.bind()), name="hetforge-hop-probe", route_prefix=None)
        found = handle.measure.remote(samples).result(timeout_s=300)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    hop = max(0.0, found["remote_ms"] - found["local_ms"])
    return {"hop_ms": hop, "samples": samples, **found}


def measure_and_cache(samples: int = 200) -> tuple[float, Path]:
    """Measure the hop and cache it for `tool_hops.load_hop_cost`; (hop ms, cache file)."""
    found = measure(samples)
    extra = {"remote_ms": round(found["remote_ms"], 4), "local_ms": round(found["local_ms"], 4), "ray": ray.__version__}
    return found["hop_ms"], save_hop_cost(found["hop_ms"], samples, extra)
