"""CPU cores of their own for vLLM's CPU engines, apart from everything else a deployment runs on the node.

vLLM's CPU engine is three processes: the frontend (in hetforge, the LLM stage's replica), `VLLM::EngineCore`
(the scheduler) and `VLLM::Worker` (the model, its OpenMP threads bound to cores). EngineCore and Worker wait for
each other by spinning on shared memory (`shm_broadcast.SpinCondition`, one second of `sched_yield` after each
read), so while requests flow they keep their cores busy whatever the model's size. Every other process that the
scheduler puts on those cores delays an engine step.

Measured with `bench/agents/bench_agents.py --tasks 48 --rounds 3 --shared-cores` (2026-12-02, 2-core x86_64 VM,
vLLM 0.32.0 CPU, the tiny Llama, 4 sessions, `bench/agents/results.md`): with EngineCore and Worker on core 0 and
everything else on core 1, the engine took 3.20-3.56 ms per output token; with every process free to run anywhere,
3.40-3.94 ms. The time per task did not differ beyond the noise (p50 504-544 against 489-544 ms): with the split,
Ray's processes, the ingress and the replica share one core.

So `deploy` (on the embedded default, where hetforge starts Ray itself) splits the node's cores: `plan` gives the
engines the lowest-numbered cores in equal slots and keeps the rest (at least one core, a quarter of them on larger
hosts: a rule of thumb, measured on 2 cores only) for Ray and every other process, which start there because Ray
starts from a thread pinned to them (`pinned`). A CPU engine's replica claims a free slot (`claim`: a lock file
per slot, released when the replica's process ends) and starts its engine from a thread pinned to the slot, with
vLLM's OpenMP threads bound to it (`VLLM_CPU_OMP_THREADS_BIND`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

SLOTS_ENV = "HETFORGE_ENGINE_CORES"  # JSON list of core lists, one per engine slot (set by deploy for its workers)
LOCKS_ENV = "HETFORGE_ENGINE_CORES_DIR"  # the folder of the slots' lock files
OMP_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"


def rest_size(cores: int) -> int:
    """Cores kept for everything but the engines: one, or a quarter of the node on larger hosts."""
    return max(1, cores // 4)


def plan(available: list[int], engines: int) -> tuple[list[list[int]], list[int]] | None:
    """(one core list per engine slot, the other processes' cores), or None when the node has too few cores to
    give each engine one of its own and keep `rest_size` for the rest."""
    cores = sorted(available)
    keep = rest_size(len(cores))
    if engines < 1 or len(cores) < engines + keep:
        return None
    per_engine = (len(cores) - keep) // engines
    slots = [cores[i * per_engine : (i + 1) * per_engine] for i in range(engines)]
    used = {c for slot in slots for c in slot}
    return slots, [c for c in cores if c not in used]


def describe(slots: list[list[int]], rest: list[int]) -> str:
    engines = " | ".join(",".join(map(str, s)) for s in slots)
    return f"vLLM CPU engines on cores {engines}; the other processes on {','.join(map(str, rest))}"


@contextlib.contextmanager
def pinned(cores: list[int] | set[int]) -> Iterator[None]:
    """Run the block on a thread bound to `cores`: processes started from it inherit them. After it, the thread
    and the threads the block started in this process (ZeroMQ's, gRPC's) get the thread's former cores back."""
    cores = set(cores)
    before = os.sched_getaffinity(0)  # 0: the calling thread
    threads = set(os.listdir("/proc/self/task"))
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)
        for tid in set(os.listdir("/proc/self/task")) - threads:
            try:
                if os.sched_getaffinity(int(tid)) == cores:
                    os.sched_setaffinity(int(tid), before)
            except OSError:  # a thread that has ended
                pass


def pin_process(cores: list[int]) -> None:
    """Bind every thread of this process to `cores` (`hetforge serve`'s own process, once its deployment has a
    plan: it is part of the deployment, not of its engines)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), set(cores))
        except OSError:  # a thread that has ended
            pass


def node_cores(environ: os._Environ | dict | None = None) -> list[int]:
    """This process's cores together with the deployment's engine slots: the node's cores hetforge was given. An
    LLM stage's re-optimization job runs its engines there, at a lower priority than serving (`jobs.lower_priority`):
    it measures engines, and on the other cores alone (one, on a 2-core host) its two engines and Ray's processes
    would share a core, which hides what a setting changes."""
    env = os.environ if environ is None else environ
    cores = set(os.sched_getaffinity(0))
    if env.get(SLOTS_ENV):
        cores |= {int(c) for slot in json.loads(env[SLOTS_ENV]) for c in slot}
    return sorted(cores)


class Claim:
    """One engine slot held by this process (a lock file, released on `release()` or when the process ends)."""

    def __init__(self, cores: list[int], fd: int | None, shared: bool):
        self.cores, self.shared = cores, shared
        self._fd = fd
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)  # closing the descriptor drops its lock
                self._fd = None


def claim(environ: os._Environ | dict | None = None) -> Claim | None:
    """A free engine slot from the deployment's plan (`SLOTS_ENV`, `LOCKS_ENV`), or None when there is no plan.
    When every slot is held (more engines than planned: a canary's, a replica being replaced) the first slot is
    shared."""
    env = os.environ if environ is None else environ
    if not env.get(SLOTS_ENV) or not env.get(LOCKS_ENV):
        return None
    slots = [list(map(int, s)) for s in json.loads(env[SLOTS_ENV])]
    folder = Path(env[LOCKS_ENV])
    folder.mkdir(parents=True, exist_ok=True)
    for i, cores in enumerate(slots):
        fd = os.open(folder / f"slot-{i}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return Claim(cores, fd, shared=False)
    return Claim(slots[0], None, shared=True)


def omp_bind(cores: list[int]) -> str:
    """`VLLM_CPU_OMP_THREADS_BIND` for one engine on `cores` (vLLM's list syntax: "0,1,2")."""
    return ",".join(map(str, cores))
