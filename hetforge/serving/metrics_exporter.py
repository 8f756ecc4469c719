"""A node's metrics exporter: serves the prometheus_client multiprocess files of one folder over HTTP.

On one machine the ingress's /metrics aggregates every replica's files. On a cluster each node's
replicas write into that node's folder, so every Ray node runs this next to it (a sidecar
container in `deploy/kubernetes/rayservice.yaml`, a second process in `deploy/compose.yaml`) and
Prometheus scrapes each node:

    python -m hetforge.serving.metrics_exporter --dir /tmp/hetforge-metrics --port 9500
"""

from __future__ import annotations

import argparse
import os
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector


def make_handler(folder: str):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path.split("?")[0] not in ("/metrics", "/"):
                self.send_error(404, "metrics are at /metrics")
                return
            registry = CollectorRegistry()
            if os.path.isdir(folder):
                MultiProcessCollector(registry, path=folder)
            body = generate_latest(registry)
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # scrapes every few seconds: not worth a log line each
            pass

    return Handler


def serve(folder: str, host: str = "0.0.0.0", port: int = 9500) -> ThreadingHTTPServer:
    return ThreadingHTTPServer((host, port), make_handler(folder))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dir",
        default=os.environ.get("PROMETHEUS_MULTIPROC_DIR", "/tmp/hetforge-metrics"),
        help="the replicas' PROMETHEUS_MULTIPROC_DIR on this node",
    )
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=9500)
    args = parser.parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    server = serve(args.dir, args.host, args.port)
    print(
        f"{time.strftime('%H:%M:%S')} serving the metrics files of {args.dir} at http://{args.host}:{args.port}/metrics",
        flush=True,
    )
    server.serve_forever()


if __name__ == "__main__":
    main()
