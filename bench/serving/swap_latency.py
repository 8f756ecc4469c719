"""Swap latency under load: from the swap API call to every replica serving the variant.

    python bench/serving/swap_latency.py --label reconfigure [--swaps 10] [--clients 4] [--out bench/serving]

Deploys a one-stage pipeline (the serving tests' classifier, 2 replicas, batched) on the embedded
default (local Ray, CPU) with whatever hetforge is importable (PYTHONPATH), keeps `--clients`
closed-loop HTTP clients sending pipeline requests, and swaps the stage `--swaps` times through the
admin API, alternating a registered variant (the same function through addmm) and the reference.
Per swap: the API round trip (it returns once every replica reported), and the time from the call
to the last replica's report in the store (`swap_reports.reported_at`, written by each replica
after its active module is switched: when it serves the variant). Every request of the run is
counted, failed ones (non-200 or transport errors) apart.

The same script measures any version of the swap path: run it once per version with its own
`--label` (PYTHONPATH pointing at that checkout). Rows go to `swap_latency.csv` (rows of other
labels are kept); `swap_latency.md` summarizes every label in the CSV; the table is printed last.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CLASSIFIER = REPO / "tests" / "data" / "serving" / "models" / "classifier.py"
PIPELINE = """name: swap-bench
entry: classify
output: classify
stages:
  - name: classify
    kind: model
    problem_file: classifier.py
    inputs:
      - {name: x, shape: [batch, 16], dtype: float32}
    batching: {max_batch_size: 8, wait_ms: 2}
    replicas: 2
"""
VARIANT = (REPO / "tests" / "data" / "serving" / "models" / "classifier_addmm.py").read_text()
FIELDS = ["label", "swap", "variant", "api_s", "all_replicas_s", "replicas", "outcomes", "commit", "host", "date"]


class Load:
    """`clients` closed-loop HTTP clients; counts answered and failed requests."""

    def __init__(self, url: str, clients: int):
        import httpx

        self.httpx, self.url, self.ok, self.failed = httpx, url, 0, []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(clients)]

    def _run(self, k: int) -> None:
        with self.httpx.Client(timeout=60) as client:
            i = 0
            while not self._stop.is_set():
                x = [[((k * 7 + i) % 13) / 13.0 for _ in range(16)]]
                try:
                    r = client.post(f"{self.url}/v1/pipelines/swap-bench/run", json={"input": {"x": x}})
                    status = r.status_code
                except self.httpx.HTTPError as err:
                    status = type(err).__name__
                with self._lock:
                    if status == 200:
                        self.ok += 1
                    else:
                        self.failed.append(status)
                i += 1

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)


def measure(label: str, swaps: int, clients: int, work: Path) -> tuple[list[dict], dict]:
    import httpx

    from hetforge.core.problem import source_fingerprint
    from hetforge.kernels.registry import Registry
    from hetforge.serving import deploy
    from hetforge.serving.ingress.auth import client_headers
    from hetforge.serving.swap_control import SwapBoard

    home = work / "home"
    home.mkdir()
    os.environ["HETFORGE_HOME"] = str(home)
    os.environ["HETFORGE_RAY_TMP"] = str(work / "ray")
    shutil.copy(CLASSIFIER, work / "classifier.py")
    (work / "pipeline.yaml").write_text(PIPELINE)
    registry_path = home / "registry.sqlite"
    variant = (
        Registry(registry_path)
        .add(
            fingerprint=source_fingerprint(CLASSIFIER.read_text()),
            device_class="cpu",
            precision="strict",
            name="addmm",
            agent="bench",
            source=VARIANT,
            verdict={"verdict": "accepted", "needs_review": False, "speedup": 1.1},
            recipe={"kind": "module"},
        )
        .id
    )
    port = _free_port()
    record = deploy.deploy(work / "pipeline.yaml", port=port, registry_path=str(registry_path))
    rows = []
    try:
        deploy.wait_until_running(record, timeout_s=600)
        board = SwapBoard(registry_path)
        with Load(record.url, clients) as load:
            time.sleep(5)  # steady load before the first swap
            for n in range(swaps):
                target = str(variant) if n % 2 == 0 else "reference"
                t0 = time.time()
                reply = httpx.post(
                    f"{record.url}/v1/pipelines/swap-bench/stages/classify/swap",
                    json={"variant": target, "wait_s": 120},
                    headers=client_headers(),
                    timeout=180,
                )
                api_s = time.time() - t0
                doc = reply.json()
                reports = board.store.execute(
                    "SELECT replica, outcome, reported_at FROM swap_reports WHERE request_id = ?",
                    (doc.get("request_id", -1),),
                ).fetchall()
                rows.append(
                    {
                        "label": label,
                        "swap": n + 1,
                        "variant": target,
                        "api_s": round(api_s, 3),
                        "all_replicas_s": round(max(r[2] for r in reports) - t0, 3) if reports else "",
                        "replicas": len(reports),
                        "outcomes": "/".join(sorted(r[1] for r in reports)) or f"HTTP {reply.status_code}",
                    }
                )
                time.sleep(3)  # load between swaps
        load_doc = {"ok": load.ok, "failed": len(load.failed), "failures": sorted(set(map(str, load.failed)))}
    finally:
        from ray import serve

        serve.shutdown()
        import ray

        ray.shutdown()
    return rows, load_doc


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summarize(rows: list[dict], loads: dict[str, dict]) -> str:
    labels = list(dict.fromkeys(r["label"] for r in rows))
    out = [
        "| path | swaps | to every replica: median s | min s | max s | median s, to the variant / to the reference "
        "| API round trip median s | requests | failed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def median(values: list[float]) -> str:
        return f"{statistics.median(values):.3f}" if values else "-"

    for label in labels:
        mine = [r for r in rows if r["label"] == label and r["all_replicas_s"] not in ("", None)]
        reached = [float(r["all_replicas_s"]) for r in mine]
        to_variant = [float(r["all_replicas_s"]) for r in mine if r["variant"] != "reference"]
        to_reference = [float(r["all_replicas_s"]) for r in mine if r["variant"] == "reference"]
        api = [float(r["api_s"]) for r in rows if r["label"] == label]
        load = loads.get(label, {})
        out.append(
            f"| {label} | {len(mine)} | {median(reached)} | {min(reached):.3f} | {max(reached):.3f} | "
            f"{median(to_variant)} / {median(to_reference)} | {median(api)} | {load.get('ok', '?')} | "
            f"{load.get('failed', '?')} |"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="the name of the swap path measured (one row group per label)")
    parser.add_argument("--swaps", type=int, default=10)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    import hetforge

    source = Path(hetforge.__file__).resolve().parents[1]
    commit = subprocess.run(
        ["git", "-C", str(source), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="swapbench-", dir="/tmp") as tmp:
        rows, load = measure(args.label, args.swaps, args.clients, Path(tmp))
    for r in rows:
        r.update(commit=commit, host=f"{platform.machine()} {os.cpu_count()} cores", date=started)
    csv_path = args.out / "swap_latency.csv"
    kept = []
    if csv_path.exists():
        with csv_path.open() as f:
            kept = [r for r in csv.DictReader(f) if r["label"] != args.label]
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows(kept + rows)
    loads_path = args.out / "swap_latency_load.csv"
    loads = {}
    if loads_path.exists():
        with loads_path.open() as f:
            loads = {r["label"]: r for r in csv.DictReader(f) if r["label"] != args.label}
    loads[args.label] = {
        "label": args.label,
        "ok": load["ok"],
        "failed": load["failed"],
        "failures": " ".join(load["failures"]),
        "clients": args.clients,
        "loadavg_1m_before": round(load_before, 2),
        "commit": commit,
        "date": started,
    }
    with loads_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, list(loads[args.label]))
        writer.writeheader()
        writer.writerows(loads.values())
    table = summarize(kept + rows, loads)
    notes = "\n".join(
        f"- {label}: commit {d['commit']}, {d['date']}, {d['clients']} closed-loop clients, "
        f"1-minute load average {d['loadavg_1m_before']} before the run"
        for label, d in loads.items()
    )
    (args.out / "swap_latency.md").write_text(
        f"# Swap latency under load ({platform.machine()}, {os.cpu_count()} cores, one model stage on 2 replicas)\n\n"
        f"{table}\n\n`python bench/serving/swap_latency.py --label LABEL` per path; rows in swap_latency.csv, "
        f"request counts in swap_latency_load.csv.\n\n{notes}\n"
    )
    print(table)


if __name__ == "__main__":
    main()
