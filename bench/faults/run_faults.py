"""Fault injection under steady load: what clients of a served pipeline see when a replica, Serve's controller
or the serve process is killed, or the registry file becomes unwritable.

    python bench/faults/run_faults.py [--clients 2] [--observe-s 30] [--out bench/faults/results_cpu.md]

Serves `bench/faults/pipeline.yaml` (a tool stage, then a model stage with 2 replicas) with `hetforge serve` on
the embedded default, in a fresh HETFORGE_HOME, and keeps `--clients` clients sending requests one after the
other (timeout 30 s each). Each fault is injected once the pipeline answers again, and counted over its window
(from the injection until `--observe-s` later):

    sent     requests started in the window
    failed   answered with a status other than 200
    lost     no answer (connection refused or reset, or the 30 s timeout)

plus the seconds from the injection to the start of the last request that failed or was lost ("last error
after"). The injection happens at the start of the window (the PID to kill is looked up before). The serve-process fault
comes last: its window ends with `hetforge down`, and the processes of its Ray instance still alive after that
are counted ("left after down").

Run it alone on the machine (it starts Ray): `flock /tmp/hetforge-heavy.lock timeout 1200 python ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from hetforge.serving import ray_instance

HERE = Path(__file__).resolve().parent
PIPELINE = HERE / "pipeline.yaml"
CLI = [sys.executable, "-m", "hetforge.cli"]
BODY = {"input": {"x": [[0.5] * 16]}}


@dataclass
class Outcome:
    started: float
    kind: str  # ok | failed | lost
    detail: str = ""


@dataclass
class Load:
    """Clients sending one request after another to the pipeline, every outcome kept with its start time."""

    url: str
    clients: int
    outcomes: list[Outcome] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        for _ in range(self.clients):
            threading.Thread(target=self._client, daemon=True).start()

    def _client(self) -> None:
        with httpx.Client(timeout=30) as http:
            while not self.stop.is_set():
                started = time.monotonic()
                try:
                    reply = http.post(self.url, json=BODY)
                    if reply.status_code == 200:
                        outcome = Outcome(started, "ok")
                    else:
                        outcome = Outcome(started, "failed", f"HTTP {reply.status_code}: {reply.text[:160]}")
                except httpx.HTTPError as err:
                    outcome = Outcome(started, "lost", f"{type(err).__name__}: {str(err)[:120]}")
                    time.sleep(0.2)  # a refused connection returns at once: do not spin
                self.outcomes.append(outcome)

    def window(self, t0: float, t1: float) -> dict:
        inside = [o for o in list(self.outcomes) if t0 <= o.started < t1]
        last_bad = max((o.started for o in inside if o.kind != "ok"), default=None)
        details = sorted({o.detail for o in inside if o.detail})
        return {
            "sent": len(inside),
            "failed": sum(o.kind == "failed" for o in inside),
            "lost": sum(o.kind == "lost" for o in inside),
            "last_error_after_s": None if last_bad is None else round(last_bad - t0, 1),
            "errors": details[:3],
        }


def cli(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout)


def wait_ok(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.post(url, json=BODY, timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"the pipeline does not answer at {url} after {timeout_s:g} s")


def replica_pid(env: dict, stage: str) -> int:
    out = cli("status", "faults", "--json", env=env)
    doc = json.loads(out.stdout.strip().splitlines()[-1])["deployments"][0]
    return next(r["pid"] for r in doc["stages"][stage]["replicas"] if r["state"] == "RUNNING")


def controller_pid(serve_pid: int) -> int:
    for pid in ray_instance.descendants(serve_pid):
        if "ray::ServeController" in " ".join(ray_instance.cmdline(pid)):
            return pid
    raise SystemExit("no ServeController process below the serve process")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--observe-s", type=float, default=30.0)
    parser.add_argument("--port", type=int, default=18470)
    parser.add_argument("--out", type=Path, default=HERE / "results_cpu.md")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="hetforge-faults-"))
    env = {**os.environ, "HETFORGE_HOME": str(home), "HETFORGE_RAY_TMP": f"/tmp/hf-faults-{os.getpid()}"}
    url = f"http://127.0.0.1:{args.port}/v1/pipelines/faults/run"
    serve = subprocess.Popen(
        [*CLI, "serve", str(PIPELINE), "--port", str(args.port)],
        env=env,
        stdout=open(home / "serve.log", "w"),  # noqa: SIM115 - the serve process keeps it until it ends
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    rows: list[tuple[str, dict]] = []
    try:
        wait_ok(url, 300)
        load = Load(url, args.clients)
        load.start()
        time.sleep(args.observe_s / 3)

        def phase(name: str, prepare, after=None) -> None:
            wait_ok(url, 120)
            inject = prepare()  # looked up before the window opens (`hetforge status` takes seconds)
            t0 = time.monotonic()
            inject()
            time.sleep(args.observe_s)
            if after is not None:
                after()
            rows.append((name, load.window(t0, time.monotonic())))
            print(name, rows[-1][1], flush=True)

        def kill(pid: int):
            return lambda: os.kill(pid, signal.SIGKILL)

        phase("none (steady load)", lambda: lambda: None)
        phase("model replica killed (SIGKILL)", lambda: kill(replica_pid(env, "classify")))
        phase("Serve controller killed (SIGKILL)", lambda: kill(controller_pid(serve.pid)))
        locked = sorted(str(p) for p in home.glob("registry.sqlite*"))
        phase(
            "registry files made unwritable (chattr +i)",
            lambda: lambda: subprocess.run(["chattr", "+i", *locked], check=True),
            lambda: subprocess.run(["chattr", "-i", *locked], check=True),
        )
        record = json.loads((home / "serve" / "faults.json").read_text())
        t0 = time.monotonic()
        os.kill(serve.pid, signal.SIGKILL)
        time.sleep(args.observe_s / 3)
        down = cli("down", "faults", env=env)
        stopped = load.window(t0, time.monotonic())
        load.stop.set()
        alive = [int(p) for p, t in record["ray_processes"].items() if ray_instance.start_ticks(int(p)) == t]
        alive += ray_instance.instance_pids(record["session_dir"])
        stopped["left_after_down"] = len(set(alive))
        stopped["down"] = down.stdout.strip().splitlines()[0] if down.stdout.strip() else down.stderr.strip()[:200]
        rows.append(("serve process killed (SIGKILL), then `hetforge down`", stopped))
        print(rows[-1][0], stopped, flush=True)
    finally:
        subprocess.run(["chattr", "-i", *[str(p) for p in home.glob("registry.sqlite*")]], check=False)
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
        cli("down", "faults", env=env)
    write(args, rows)


def write(args, rows: list[tuple[str, dict]]) -> None:
    lines = [
        "# Faults under steady load",
        "",
        f"`python bench/faults/run_faults.py --clients {args.clients} --observe-s {args.observe_s:g}` on "
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d', time.gmtime())}. Pipeline `bench/faults/pipeline.yaml` (a tool stage, then a "
        "model stage with 2 replicas) served by `hetforge serve` on the embedded default; each window runs from "
        "the injection to its end (the script's docstring defines the columns).",
        "",
        "| fault | sent | failed | lost | last error after (s) | errors seen (first 3 kinds) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows:
        errors = "; ".join(e.replace("|", "/") for e in r["errors"]) or "-"
        recovered = "-" if r["last_error_after_s"] is None else f"{r['last_error_after_s']:g}"
        lines.append(f"| {name} | {r['sent']} | {r['failed']} | {r['lost']} | {recovered} | {errors} |")
    for name, r in rows:
        if "left_after_down" in r:
            lines += [
                "",
                f"After the serve process was killed: `hetforge down` printed `{r['down']}`; processes of that "
                f"Ray instance still alive afterwards: {r['left_after_down']}.",
            ]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
