"""A Ray Serve application builder, for clusters where Serve itself deploys the application
(KubeRay's RayService `serveConfigV2`, or `serve run`/`serve deploy` with a config file):

    applications:
      - name: page-triage
        route_prefix: /
        import_path: hetforge.serving.entry:app
        args: {pipeline: /app/examples/page_triage.yaml}

It does what `hetforge serve --address` does inside the cluster: loads and checks the pipeline,
plans it on the cluster's devices (`planners.devices.ray_inventory`: GPU models from Ray's
accelerator_type, CPU node groups from `cpu_class:<name>`), and builds the application. The
registry is `args.registry` or `$HETFORGE_HOME/registry.sqlite` (on a cluster: a volume every node
mounts), the metrics folder `$PROMETHEUS_MULTIPROC_DIR` (per node; `metrics_exporter` serves it).
The admin routes' API token (`ingress.auth`) is read where this builder runs: set HETFORGE_API_TOKEN
(or HETFORGE_API_TOKEN_FILE, for example a mounted Kubernetes secret) in the cluster's environment;
otherwise a new token is written under that node's HETFORGE_HOME and printed once to its log.
"""

from __future__ import annotations

import os
from pathlib import Path

from hetforge.config import home_dir
from hetforge.planners import devices
from hetforge.serving.deploy import check_servable, placement_for
from hetforge.serving.deployments import build_app
from hetforge.spec import load_pipeline


def app(args: dict):
    """The bound application of the pipeline at `args["pipeline"]` (Serve calls this with the config's `args`)."""
    if "pipeline" not in args:
        raise ValueError(
            "hetforge.serving.entry:app needs args.pipeline: the pipeline file's path on the cluster's nodes"
        )
    pipeline_file = Path(args["pipeline"])
    pipeline = load_pipeline(pipeline_file)
    base_dir = pipeline_file.resolve().parent
    check_servable(pipeline, base_dir)
    placement, _ = placement_for(pipeline, base_dir, devices.ray_inventory())
    registry_path = str(args.get("registry") or home_dir() / "registry.sqlite")
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or str(home_dir() / "serve" / f"{pipeline.name}.metrics")
    os.makedirs(metrics_dir, exist_ok=True)
    return build_app(pipeline, base_dir, placement, registry_path, metrics_dir)
