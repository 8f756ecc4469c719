"""Worker processes for untrusted code: spawn, talk with deadlines, pause, and kill.

All subprocess side effects of verification go through `WorkerProcess`. A worker runs in its own
session (process group), so that it and anything it forks can be stopped or killed together, and
confines itself before it loads any candidate (`hetforge.optimizer.confine`): an allow-listed
environment, writes only in its scratch folder, no network, a process limit (a pids cgroup made
here when the host allows), a CPU-time limit. `trusted` workers (references, hetforge's own
recipes and kernels) may also write the shared compile cache; generated code gets its own.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import hetforge
from hetforge import config
from hetforge.optimizer import confine, lifetime
from hetforge.optimizer.channel import Channel, ChannelClosed, ChannelCorrupt, ChannelTimeout
from hetforge.optimizer.verdict import excerpt

_PACKAGE_ROOT = str(Path(hetforge.__file__).resolve().parents[1])
_serial = itertools.count()
# Workers are forked from this one thread: the kernel sends a worker its parent-death signal when the thread that
# forked it exits, and this thread lives as long as the judge (a pool's thread that ends would kill its workers).
# Per process: a forked copy of the judge has neither the thread nor the reaper.
_spawner: tuple[int, concurrent.futures.ThreadPoolExecutor] | None = None
_reaper: tuple[int, lifetime.Reaper] | None = None  # (the judge's pid, its reaper)
_spawner_lock = threading.Lock()


def _spawn(argv: list[str], cgroups: list[str], **popen) -> subprocess.Popen:
    """Start a worker from the spawner thread and put it into its cgroups at once (before it can fork)."""
    global _spawner

    def start() -> subprocess.Popen:
        global _reaper
        if _reaper is None or _reaper[0] != os.getpid():  # the first worker of this judge (or of a forked copy)
            lifetime.sweep()  # what dead judges left
            env = {
                **os.environ,
                "PYTHONPATH": os.pathsep.join(p for p in (_PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p),
            }
            _reaper = (os.getpid(), lifetime.Reaper(env))
        proc = subprocess.Popen(argv, **popen)
        confine.join_cgroups(proc.pid, cgroups)  # a failure is reported by the worker's own join
        _reaper[1].track(proc.pid)
        return proc

    with _spawner_lock:
        if _spawner is None or _spawner[0] != os.getpid():
            _spawner = (os.getpid(), concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hetforge-spawner"))
    return _spawner[1].submit(start).result()


@dataclass(frozen=True)
class WorkerFailure(Exception):
    """The worker did not answer: it timed out, crashed, exited or broke the protocol."""

    kind: str  # timeout | crashed | exited | protocol
    message: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


class WorkerProcess:
    """One `hetforge.optimizer.worker` process and the pipes to it."""

    def __init__(
        self, name: str, memory_mb: int = 0, scratch: str | None = None, warm_device: str = "cpu", trusted: bool = False
    ):
        self.name = name
        self.trusted = trusted
        self._own_scratch = scratch is None  # removed at close()
        self.scratch = scratch or tempfile.mkdtemp(prefix=f"{lifetime.SCRATCH_PREFIX}{lifetime.owner_tag()}-{name}-")
        self.log_path = os.path.join(self.scratch, "worker.log")
        to_worker_r, to_worker_w = os.pipe()
        from_worker_r, from_worker_w = os.pipe()
        shared = None
        if trusted:
            shared = str(config.compile_cache_dir())
            os.makedirs(shared, exist_ok=True)
        env = confine.worker_environment(dict(os.environ), self.scratch, shared)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
        env["HETFORGE_WORKER_PARENT"] = str(os.getpid())  # the worker's parent-death signal checks it
        self.cgroups: list[str] = []
        if config.confine_workers():
            max_procs = config.worker_max_procs()
            made = confine.make_worker_cgroups(f"{lifetime.owner_tag()}-{next(_serial)}", max_procs)
            self.cgroups = sorted({p for p in made.values() if p})
            env["HETFORGE_WORKER_CONFINE"] = json.dumps(
                {
                    "writable": [self.scratch] + ([shared] if shared else []),
                    "cpu_s": config.worker_cpu_s(),
                    "max_procs": max_procs,
                    "cgroup": made["pids"],
                    "trusted": trusted,
                }
            )
        if warm_device == "cuda":
            env["HETFORGE_WORKER_WARM_CUDA"] = "1"  # make the CUDA context while waiting for work
        with open(self.log_path, "wb") as log:
            self.proc = _spawn(
                [
                    sys.executable,
                    "-m",
                    "hetforge.optimizer.worker",
                    str(to_worker_r),
                    str(from_worker_w),
                    str(memory_mb),
                ],
                self.cgroups,
                pass_fds=(to_worker_r, from_worker_w),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.scratch,
                env=env,
                start_new_session=True,
            )
        os.close(to_worker_r)
        os.close(from_worker_w)
        self.channel = Channel(from_worker_r, to_worker_w)
        self._fds = (from_worker_r, to_worker_w)
        self.paused = False
        self.output_bytes: int | None = None  # bytes of the reference's outputs of one call (set by the judge)

    def request(self, message: dict, timeout_s: float) -> dict:
        """Send one command and wait for its reply; WorkerFailure (and the worker killed) otherwise."""
        self.send(message, timeout_s)
        return self.receive(message.get("cmd", "?"), timeout_s, self.reply_limit(message))

    def reply_limit(self, message: dict) -> int | None:
        """The most tensor bytes a reply to `message` may carry, once `output_bytes` is known (None: the channel's
        limit). Twice the reference's outputs and a MiB: a wrong dtype (float64 for float32) is still received,
        and rejected for its dtype; a frame that claims gigabytes is refused before any of it is read."""
        command = message.get("cmd")
        if command not in ("run", "fetch"):
            return 1 << 20  # the other replies carry no tensors
        if self.output_bytes is None:
            return None
        per_call = 2 * self.output_bytes + (1 << 20)
        return per_call * (max(1, len(message.get("indices") or [])) if command == "fetch" else 1)

    def send(self, message: dict, timeout_s: float = 60.0) -> None:
        """The first half of `request`: the reply is read by `receive` (start-ups of several workers overlap)."""
        try:
            self.channel.send(message, timeout_s)
        except ChannelTimeout:
            self.kill()
            raise WorkerFailure(
                "timeout", f"the worker did not take {message.get('cmd', '?')} within {timeout_s:.0f} s"
            ) from None
        except ChannelClosed:
            raise self._death(message.get("cmd", "?")) from None

    def receive(self, command: str, timeout_s: float, max_bytes: int | None = None) -> dict:
        """The reply to `command` (its tensors bounded by `max_bytes`, default `reply_limit`); WorkerFailure otherwise."""
        if max_bytes is None:
            max_bytes = self.reply_limit({"cmd": command})
        try:
            reply = self.channel.recv(timeout_s, max_bytes)
        except ChannelTimeout:
            self.kill()
            raise WorkerFailure("timeout", f"no answer to {command} within {timeout_s:.0f} s") from None
        except ChannelCorrupt as err:
            self.kill()
            raise WorkerFailure("protocol", f"malformed reply to {command}: {err}") from None
        except ChannelClosed:
            raise self._death(command) from None
        if isinstance(reply, dict) and "error" in reply:  # the worker's own words: quoted bounded and sanitized
            reply = {"error": excerpt(str(reply["error"]), 40), "message": excerpt(str(reply.get("message", "")))}
        return reply

    def _death(self, command: str) -> WorkerFailure:
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.proc.returncode
        if code is not None and code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            why = " (its CPU-time limit)" if -code == signal.SIGXCPU else ""
            return WorkerFailure("crashed", f"worker killed by {name}{why} during {command}{self._tail()}")
        return WorkerFailure("exited", f"worker exited with code {code} during {command}{self._tail()}")

    def _tail(self) -> str:
        try:
            text = Path(self.log_path).read_text(errors="replace").strip()
        except OSError:
            return ""
        lines = [line for line in text[-20000:].splitlines() if line.strip()][-3:]
        return "; log: " + excerpt(" | ".join(lines)) if lines else ""

    def pause(self) -> None:
        """Stop the worker and everything it forked (so it cannot load the machine while another is timed)."""
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        if self.paused and self.alive():
            os.killpg(self.proc.pid, signal.SIGCONT)
        self.paused = False

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for cgroup in self.cgroups:  # anything the candidate forked that is still in the cgroup, then the folder
            confine.remove_cgroup(cgroup)
        self.cgroups = []
        if self.proc.returncode is not None and _reaper is not None and _reaper[0] == os.getpid():
            _reaper[1].forget(self.proc.pid)  # reaped: its number may be reused

    def close(self) -> None:
        """Ask the worker to exit, then make sure it and its children are gone."""
        if self.alive():
            self.resume()
            try:
                self.channel.send({"cmd": "exit"}, timeout_s=2)
                self.proc.wait(timeout=2)
            except (ChannelClosed, ChannelTimeout, subprocess.TimeoutExpired):
                pass
        self.kill()
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        if self._own_scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SparePool:
    """Worker processes started ahead of need, so that a verification does not wait for Python and
    torch to import (several seconds a worker on a GPU host).

    A spare is a fresh worker that has imported torch (and, for CUDA, made its context) and waits
    for its first message; each verification still gets processes no candidate ever ran in. When
    one is taken, a replacement starts at once, so its import overlaps the taker's start-up and
    correctness checks; the judge pauses all spares while it times (`spares_paused()`). Only within
    `spare_workers(...)`: a lone `hetforge verify` starts its workers as before. `initial`: how many
    trusted spares to start at first (a supervisor's first batch takes one per check side by side).
    """

    def __init__(self, size: int, memory_mb: int, device: str, initial: int = 0):
        self.size, self.memory_mb, self.device = size, memory_mb, device
        self.initial = max(size, initial)
        self.idle: list[WorkerProcess] = []
        self.lock = threading.Lock()
        self.taken = 0

    def _start(self, trusted: bool = True) -> WorkerProcess:
        return WorkerProcess("spare", self.memory_mb, warm_device=self.device, trusted=trusted)

    def fill(self) -> None:
        """`initial` trusted spares (references and hetforge's own candidates are most of the work), one untrusted."""
        with self.lock:
            self.idle = [w for w in self.idle if w.alive()]
            while sum(w.trusted for w in self.idle) < self.initial:
                self.idle.append(self._start())
            if not any(not w.trusted for w in self.idle):
                self.idle.append(self._start(trusted=False))

    def take(self, name: str, trusted: bool) -> WorkerProcess:
        with self.lock:
            worker = None
            for candidate in [w for w in self.idle if w.trusted == trusted]:
                self.idle.remove(candidate)
                if candidate.alive():
                    worker = candidate
                    break
                candidate.close()
            if sum(w.trusted == trusted for w in self.idle) < (self.size if trusted else 1):
                self.idle.append(self._start(trusted))  # the replacement imports while the taker works
            if worker is None:
                return WorkerProcess(name, self.memory_mb, warm_device=self.device, trusted=trusted)
            self.taken += 1
            worker.name = name
            return worker

    def pause(self) -> None:
        with self.lock:
            for w in self.idle:
                w.pause()

    def resume(self) -> None:
        with self.lock:
            for w in self.idle:
                w.resume()

    def close(self) -> None:
        with self.lock:
            close_all(self.idle)
            self.idle = []


_pool: SparePool | None = None


@contextlib.contextmanager
def spare_workers(size: int = 2, memory_mb: int = 0, device: str = "cpu", initial: int = 0):
    """Within the block, `start_worker` takes pre-started workers (see SparePool)."""
    global _pool
    previous, _pool = _pool, SparePool(size, memory_mb, device, initial)
    _pool.fill()
    try:
        yield _pool
    finally:
        _pool.close()
        _pool = previous


def start_worker(name: str, memory_mb: int = 0, device: str = "cpu", trusted: bool = False) -> WorkerProcess:
    """A fresh worker: a spare when a pool for this memory limit and device is active, else a new process.

    `trusted`: for the reference and hetforge's own candidates, which may share the compile cache.
    """
    pool = _pool
    if pool is not None and pool.memory_mb == memory_mb and pool.device == device:
        return pool.take(name, trusted)
    # CUDA's context is made before the worker confines itself, as a spare's is: the driver opens its files and
    # sockets (persistenced, MPS) before Landlock and seccomp close them
    return WorkerProcess(name, memory_mb, warm_device=device, trusted=trusted)


@contextlib.contextmanager
def spares_paused():
    """Stop every idle spare for the duration (timing): their start-up must not load the machine."""
    pool = _pool
    if pool is None:
        yield
        return
    pool.pause()
    try:
        yield
    finally:
        pool.resume()


def close_all(workers: list) -> None:
    """Close workers (or anything with close()) side by side: a worker with a CUDA context takes seconds to exit."""
    if len(workers) <= 1:
        for w in workers:
            w.close()
        return
    with concurrent.futures.ThreadPoolExecutor(len(workers)) as pool:
        list(pool.map(lambda w: w.close(), workers))
