"""Nothing outlives a judge: on every exit path (normal, exception, SIGINT, SIGTERM, SIGKILL) its workers die,
a stopped (state T) one included, and their cgroup and scratch folders are removed; a sweep at start-up removes
what a judge that died without its reaper left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hetforge.optimizer import confine, lifetime

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

# The judge under test: a verification of a candidate that never answers, so its workers are up and busy.
JUDGE = textwrap.dedent(
    """
    import signal, sys
    from hetforge.core.problem import Problem
    from hetforge.optimizer.judge import VerifyOptions, verify
    from hetforge.optimizer.sandbox import start_worker

    def fail(*_):
        raise RuntimeError("the judge failed")

    signal.signal(signal.SIGUSR1, fail)
    # As started from a terminal: a command started in the background of a shell without job control (`cmd &` in a
    # script) inherits SIGINT ignored, and so would this judge (Python keeps an ignored SIGINT ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if sys.argv[1] == "normal":  # workers started and never closed, then a normal exit
        workers = [start_worker("forgotten"), start_worker("forgotten-2")]
        print("up", flush=True)
        sys.stdin.readline()
    else:
        verify(Problem(file=sys.argv[2]), sys.argv[3], VerifyOptions(trials=1, time=False, threads=1, timeout_s=600))
    """
)


def _workers_of(judge: int) -> dict[int, dict]:
    """Live processes started as workers of `judge` (forked copies included): pid -> state, scratch, cgroups."""
    marker = f"HETFORGE_WORKER_PARENT={judge}".encode()
    out = {}
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or marker not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            state = (proc / "stat").read_text().rsplit(") ", 1)[1].split()[0]
            if state == "Z":
                continue
            cgroups = [
                line.split(":", 2)[2] for line in (proc / "cgroup").read_text().splitlines() if "hetforge-" in line
            ]
            out[int(proc.name)] = {"state": state, "cwd": os.readlink(proc / "cwd"), "cgroups": cgroups}
        except OSError:
            continue
    return out


def _cgroup_dirs(relative: list[str]) -> list[Path]:
    return [
        root / rel.lstrip("/")
        for root in confine.cgroup_roots()
        for rel in relative
        if (root / rel.lstrip("/")).is_dir()
    ]


def _wait(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


def _start_judge(tmp_path: Path, mode: str, argv: list[str] | None = None) -> subprocess.Popen:
    script = tmp_path / "judge.py"
    script.write_text(JUDGE)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(REPO)}
    argv = argv or [
        sys.executable,
        str(script),
        mode,
        str(HERE / "problems" / "linear_relu.py"),
        str(HERE / "candidates" / "hangs.py"),
    ]
    return subprocess.Popen(
        argv, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def _end_and_check(judge: subprocess.Popen, tmp_path: Path, end, workers_expected: int = 2) -> None:
    """Wait for the judge's workers, stop one (SIGSTOP), end the judge with `end(judge)`, then check that nothing is left."""
    try:
        assert _wait(lambda: len(_workers_of(judge.pid)) >= workers_expected, 240), _workers_of(judge.pid)
        time.sleep(1.0)  # past the workers' start-up: their confinement has moved them into their cgroups
        workers = _workers_of(judge.pid)
        stopped = min(workers)
        os.kill(stopped, signal.SIGSTOP)
        assert _wait(lambda: _workers_of(judge.pid).get(stopped, {}).get("state") == "T", 10)
        scratch = {Path(w["cwd"]) for w in workers.values()}
        cgroups = _cgroup_dirs([c for w in workers.values() for c in w["cgroups"]])
        assert all(s.is_dir() and s.parent == tmp_path / "tmp" for s in scratch), scratch
        end(judge)
        judge.wait(timeout=120)
        assert _wait(lambda: not _workers_of(judge.pid), 60), _workers_of(judge.pid)
        assert _wait(lambda: not any(s.exists() for s in scratch), 60), [s for s in scratch if s.exists()]
        assert _wait(lambda: not any(c.exists() for c in cgroups), 60), [c for c in cgroups if c.exists()]
        assert list((tmp_path / "tmp").glob(f"{lifetime.SCRATCH_PREFIX}*")) == []
    finally:
        if judge.poll() is None:
            judge.kill()
            judge.wait()
        for pid in _workers_of(judge.pid):  # only if the test failed: never leave them behind either
            os.kill(pid, signal.SIGKILL)


def _signal(sig: int):
    return lambda judge: judge.send_signal(sig)


@pytest.mark.parametrize("how", ["sigkill", "sigterm", "sigint", "exception", "normal"], ids=lambda h: h)
def test_a_judges_workers_die_with_it_and_leave_no_folders(tmp_path, how):
    judge = _start_judge(tmp_path, how)
    if how == "normal":
        end = lambda j: (j.stdin.write(b"\n"), j.stdin.flush())  # noqa: E731
    else:
        sig = {
            "sigkill": signal.SIGKILL,
            "sigterm": signal.SIGTERM,
            "sigint": signal.SIGINT,
            "exception": signal.SIGUSR1,
        }
        end = _signal(sig[how])
    _end_and_check(judge, tmp_path, end)


def test_hetforge_optimize_killed_leaves_nothing(tmp_path):
    """The issue's case: `hetforge optimize` SIGKILLed while one of its workers waits stopped."""
    argv = [
        sys.executable,
        "-m",
        "hetforge.cli",
        "optimize",
        str(HERE / "problems" / "linear_relu.py"),
        "--budget-s",
        "300",
    ]
    _end_and_check(_start_judge(tmp_path, "", argv), tmp_path, _signal(signal.SIGKILL))


def test_sweep_removes_what_dead_judges_left_and_keeps_live_ones(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    dead_tag = f"{dead.pid}.{12345}"
    live_tag = lifetime.owner_tag()
    left = [
        tmp_path / f"{lifetime.SCRATCH_PREFIX}{dead_tag}-candidate-x",
        tmp_path / f"{lifetime.SCRATCH_PREFIX}{live_tag}-candidate-y",
    ]
    # the live judge's tag with another start time: the same PID reused by another process is a dead judge
    reused = tmp_path / f"{lifetime.SCRATCH_PREFIX}{os.getpid()}.1-candidate-z"
    for folder in (*left, reused):
        (folder / "tmp").mkdir(parents=True)
    stranger = tmp_path / "hetforge-candidate-abc"  # no owner tag: not ours to judge
    stranger.mkdir()
    made = confine.make_worker_cgroups(f"{dead_tag}-0", 16)
    cgroups = {Path(p) for p in made.values() if p}
    lifetime.sweep(str(tmp_path))
    assert not left[0].exists() and not reused.exists()
    assert left[1].exists() and stranger.exists()
    assert not any(c.exists() for c in cgroups)
