"""deploy/: the compose file and the Kubernetes manifests, checked against the code they run.

No Docker or Kubernetes here: these tests check structure. Every file a manifest references exists;
the ports and paths Prometheus scrapes are the ones the code serves; the worker groups' accelerator
labels are the planner's device classes; the RayService's entry point builds the application.
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "kubernetes"


def _yaml(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _ingress_routes() -> set[str]:
    pytest.importorskip("ray.serve")
    from hetforge.serving.ingress import create_app

    return {route.path for route in create_app().routes}


# ---------------------------------------------------------------------------------------------- compose
def test_compose_references_files_that_exist_and_scrapes_the_ingress():
    compose = _yaml(DEPLOY / "compose.yaml")[0]
    services = compose["services"]
    assert {"ray-head", "ray-worker-cpu", "ray-worker-gpu", "prometheus", "grafana"} <= set(services)
    for name, svc in services.items():
        build = svc.get("build")
        if build:
            context = (DEPLOY / build["context"]).resolve()
            assert context == REPO and (context / build["dockerfile"]).is_file(), name
        command = svc.get("command") or []
        for arg in command:
            if arg.startswith("deploy/"):
                assert (REPO / arg).is_file(), f"{name}: {arg}"
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source}"
    # the Dockerfile copies what the containers run
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    for folder in ("hetforge", "examples", "scripts"):
        assert f"COPY {folder} ./{folder}" in dockerfile
    head_env = services["ray-head"]["environment"]
    assert (REPO / head_env["HETFORGE_PIPELINE"]).is_file()
    # the head serves on 8000, published; Prometheus scrapes the ingress's /metrics there
    head_sh = (DEPLOY / "head.sh").read_text()
    port = re.search(r"hetforge serve .* --port (\d+)", head_sh).group(1)
    assert f"{port}:{port}" in services["ray-head"]["ports"]
    prom = _yaml(DEPLOY / "prometheus" / "prometheus.yml")[0]["scrape_configs"][0]
    assert prom["metrics_path"] in _ingress_routes()
    assert prom["static_configs"][0]["targets"] == [f"ray-head:{port}"]
    # the CPU worker declares a device class the spec accepts and the planner turns into a CPU class
    from hetforge.planners.devices import CPU_CLASS_RESOURCE
    from hetforge.spec.models import normalize_device

    resources = json.loads(services["ray-worker-cpu"]["environment"]["RAY_RESOURCES"])
    (key,) = resources
    assert key.startswith(CPU_CLASS_RESOURCE) and normalize_device(
        key.removeprefix(CPU_CLASS_RESOURCE)
    ) == key.removeprefix(CPU_CLASS_RESOURCE)
    assert "RAY_RESOURCES" in (DEPLOY / "worker.sh").read_text()


def test_compose_grafana_gets_the_generated_provisioning_and_dashboard():
    services = _yaml(DEPLOY / "compose.yaml")[0]["services"]
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    assert (DEPLOY / "../dashboards/provisioning").resolve() == REPO / "dashboards" / "provisioning"
    assert mounts["../dashboards/provisioning"] == "/etc/grafana/provisioning"
    provider = _yaml(REPO / "dashboards" / "provisioning" / "dashboards" / "hetforge.yaml")[0]["providers"][0]
    assert mounts["../dashboards/hetforge.json"] == provider["options"]["path"] + "/hetforge.json"
    datasource = _yaml(REPO / "dashboards" / "provisioning" / "datasources" / "prometheus.yaml")[0]["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090" and "prometheus" in services  # the compose service's name
    assert "9090:9090" in services["prometheus"]["ports"]


# ---------------------------------------------------------------------------------------------- Kubernetes
def _rayservice() -> dict:
    return _yaml(K8S / "rayservice.yaml")[0]


def test_kustomization_lists_existing_manifests():
    kustomization = _yaml(K8S / "kustomization.yaml")[0]
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource
        for doc in _yaml(K8S / resource):
            assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"]


def test_rayservice_entry_point_and_pipeline_exist_in_the_image():
    serve_config = yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])
    (application,) = serve_config["applications"]
    module, _, attr = application["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), attr)
    assert callable(builder)
    pipeline = application["args"]["pipeline"]
    assert (
        pipeline.startswith("/app/") and (REPO / pipeline.removeprefix("/app/")).is_file()
    )  # the Dockerfile's WORKDIR /app
    with pytest.raises(ValueError, match="args.pipeline"):
        builder({})
    assert serve_config["http_options"]["port"] == 8000


def test_rayservice_metrics_folder_exporter_and_scrape_config_agree():
    serve_config = yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])
    env = serve_config["applications"][0]["runtime_env"]["env_vars"]
    folder = env["PROMETHEUS_MULTIPROC_DIR"]
    cluster = _rayservice()["spec"]["rayClusterConfig"]
    from hetforge.serving import metrics_exporter

    groups = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    for group in groups:
        spec = group["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        containers = {c["name"]: c for c in spec["containers"]}
        exporter = containers["metrics-exporter"]
        args = exporter["command"]
        assert args[:3] == ["python", "-m", metrics_exporter.__name__]
        assert args[args.index("--dir") + 1] == folder
        port = int(args[args.index("--port") + 1])
        assert {"containerPort": port, "name": "metrics"} in exporter["ports"]
        ray_container = next(c for n, c in containers.items() if n != "metrics-exporter")
        mounts = {m["mountPath"]: m["name"] for m in ray_container["volumeMounts"]}
        assert "emptyDir" in volumes[mounts[folder]]  # the replicas' files, per pod, shared with the exporter
        assert "emptyDir" in volumes[mounts[env["HETFORGE_HOME"]]]  # per pod: shared state is in PostgreSQL
        assert group["template"]["metadata"]["labels"]["hetforge.dev/metrics"] == "true"
    scrape = yaml.safe_load(_yaml(K8S / "prometheus-scrape.yaml")[0]["data"]["prometheus.yml"])["scrape_configs"][0]
    assert scrape["metrics_path"] == "/metrics"
    keeps = {tuple(r["source_labels"]): r["regex"] for r in scrape["relabel_configs"] if r.get("action") == "keep"}
    assert keeps[("__meta_kubernetes_pod_label_hetforge_dev_metrics",)] == "true"
    assert keeps[("__meta_kubernetes_pod_container_port_name",)] == "metrics"


def test_worker_groups_are_the_planners_device_classes():
    from hetforge.core.devices import GPU_FACTS, gpu_class
    from hetforge.planners.devices import CPU_CLASS_RESOURCE
    from hetforge.spec.models import normalize_device

    groups = _rayservice()["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    kinds = set()
    for group in groups:
        template = group["template"]
        label = template["metadata"]["labels"]["hetforge.dev/device-class"]
        product = template["spec"].get("nodeSelector", {}).get("nvidia.com/gpu.product")
        if product:  # a GPU group: NVIDIA's product label names the class Ray's accelerator_type and the planner use
            assert gpu_class(product.replace("-", " ")) == label and label in GPU_FACTS, (
                group["groupName"],
                product,
                label,
            )
            limits = template["spec"]["containers"][0]["resources"]["limits"]
            assert int(limits["nvidia.com/gpu"]) >= 1
            kinds.add("gpu")
        else:  # a CPU group: declares its class as the cpu_class resource the planner reads
            resources = json.loads(json.loads(group["rayStartParams"]["resources"]))
            assert resources == {CPU_CLASS_RESOURCE + label: resources[CPU_CLASS_RESOURCE + label]}
            assert normalize_device(label) == label
            kinds.add("cpu")
    assert kinds == {"cpu", "gpu"}


def test_dashboards_configmap_is_in_the_kustomization():
    resources = _yaml(K8S / "kustomization.yaml")[0]["resources"]
    assert "dashboards-configmap.yaml" in resources
    cm = _yaml(K8S / "dashboards-configmap.yaml")[0]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1" and "hetforge.json" in cm["data"]


def test_head_script_deploys_with_the_cli():
    text = (DEPLOY / "head.sh").read_text()
    serve_line = next(line for line in text.splitlines() if line.startswith("hetforge serve"))
    args = shlex.split(serve_line)
    assert "--address" in args and "--host" in args


# ---------------------------------------------------------------------------------------------- PostgreSQL
def test_kubernetes_runs_postgresql_with_its_volume_and_every_ray_container_reaches_it():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in _yaml(K8S / "postgres.yaml")}
    sts, svc = docs[("StatefulSet", "postgres")], docs[("Service", "postgres")]
    assert "postgres.yaml" in _yaml(K8S / "kustomization.yaml")[0]["resources"]
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/var/lib/postgresql/data"} in container["volumeMounts"]
    env = {e["name"]: e for e in container["env"]}
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "hetforge-postgres", "key": "password"}
    assert svc["spec"]["ports"][0]["port"] == 5432 and svc["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]
    cluster = _rayservice()["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]:
        ray_container = group["template"]["spec"]["containers"][0]
        ray_env = {e["name"]: e for e in ray_container["env"]}
        url = ray_env["HETFORGE_STATE_URL"]["value"]
        assert (
            url
            == f"postgresql://{env['POSTGRES_USER']['value']}@postgres.hetforge.svc:5432/{env['POSTGRES_DB']['value']}"
        )
        assert ray_env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "hetforge-postgres", "key": "password"}
    serve_config = yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])
    assert "registry" not in serve_config["applications"][0]["args"]  # $HETFORGE_STATE_URL decides
    for path in K8S.glob("*.yaml"):
        assert "ReadWriteMany" not in path.read_text(), path
        assert "password:" not in path.read_text().replace("key: password", ""), path  # no password in a file


def test_compose_runs_postgresql_and_takes_the_password_from_the_shell():
    services = _yaml(DEPLOY / "compose.yaml")[0]["services"]
    pg = services["postgres"]
    assert any(v.endswith(":/var/lib/postgresql/data") for v in pg["volumes"])
    assert pg["environment"]["POSTGRES_PASSWORD"].startswith("${HETFORGE_DB_PASSWORD:?")
    for name in ("ray-head", "ray-worker-cpu", "ray-worker-gpu"):
        env = services[name]["environment"]
        assert env["HETFORGE_STATE_URL"] == "postgresql://hetforge@postgres:5432/hetforge", name
        assert env["PGPASSWORD"] == pg["environment"]["POSTGRES_PASSWORD"], name
        assert services[name]["depends_on"]["postgres"] == {"condition": "service_healthy"}, name
    assert "postgres" in (DEPLOY / "Dockerfile").read_text()  # the image installs the postgres extra (psycopg)
