"""Devices: a table of facts for common GPUs and CPUs, and the inventory the planner places onto.

A *device class* is what placement chooses between: `cpu`, a named group of CPU nodes such as
`cpu-highmem`, or a GPU model such as `H100`. The inventory says how many devices of each class
there are, their memory, and how fast data moves between classes. It comes from local discovery, a
running Ray cluster, or a declared cluster file.

In a Ray cluster, GPU classes come from the `accelerator_type:<model>` resource Ray puts on GPU
nodes. CPU nodes may name their class with a custom resource `cpu_class:<name>` (`ray start
--resources '{"cpu_class:cpu-highmem": 1000}'`, or a KubeRay worker group's rayStartParams): once
any node does, CPU stages go only to nodes that declare a class (not to the head or GPU nodes), and
a stage placed on a class requests a sliver of its resource, so Ray puts it on such a node.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hetforge.core.devices import GPU_FACTS, DeviceFacts, gpu_class


def cpu_facts(cores: int, memory_gib: float, avx512: bool = True, name: str = "cpu") -> DeviceFacts:
    """A CPU's roofline figures from its core count.

    Peak: 2.5 GHz x (16 fp32 lanes with AVX-512, 8 with AVX2) x 2 (FMA) x 2 FMA units per core
    (Intel Xeon Scalable / AMD Zen 4 optimization manuals). Bandwidth: ~5 GB/s of achievable DRAM
    bandwidth per core, capped at 300 GB/s (12-channel DDR5 sockets measure 250-350 GB/s in STREAM).
    """
    lanes = 16 if avx512 else 8
    tflops = cores * 2.5e9 * lanes * 2 * 2 / 1e12
    return DeviceFacts(name, tflops, tflops, tflops, min(5.0 * cores, 300.0), memory_gib, 1.0 * cores, launch_us=2.0)


@dataclass(frozen=True)
class DeviceClass:
    """Devices of one kind that placement can choose: how many, their facts, where they live."""

    name: str  # "cpu" or a GPU model
    kind: str  # cpu | gpu
    count: int  # devices (CPU: nodes' host CPUs; GPU: GPUs)
    facts: DeviceFacts
    nodes: tuple[str, ...] = ()  # node types that have it
    local: bool = False  # present on this machine (so stages can be measured on it)
    resource: str | None = None  # the Ray resource that puts a replica on this class's nodes (CPU classes by name)


@dataclass(frozen=True)
class Inventory:
    """What placement can use, and the cost of moving bytes between device classes."""

    classes: dict[str, DeviceClass]
    host_link_gbs: float = 25.0  # CPU <-> GPU on one node, GB/s (PCIe Gen4 x16)
    network_gbs: float = 12.5  # between nodes, GB/s
    network_latency_ms: float = 0.02
    source: str = "local"
    notes: tuple[str, ...] = field(default=())

    def transfer_ms(self, a: str, b: str, nbytes: float) -> float:
        """Time to move `nbytes` from a stage on class `a` to a stage on class `b`."""
        if a == b:
            return 0.0
        ca, cb = self.classes[a], self.classes[b]
        same_node = bool(set(ca.nodes) & set(cb.nodes)) and (ca.kind == "cpu" or cb.kind == "cpu")
        if same_node:
            return 0.01 + nbytes / (self.host_link_gbs * 1e6)
        return self.network_latency_ms + nbytes / (self.network_gbs * 1e6)


def _meminfo_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / (1 << 20)
    except OSError:
        pass
    return 8.0


def local_cpu() -> dict:
    """This machine's CPU: model, cores, memory, vector ISA."""
    model, flags = platform.processor() or "cpu", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", "cpu", platform.processor()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1]
    except OSError:
        pass
    isa = "avx512" if "avx512f" in flags else ("avx2" if "avx2" in flags else "baseline")
    return {"model": model, "cores": os.cpu_count() or 1, "memory_gib": round(_meminfo_gib(), 1), "isa": isa}


def local_gpus() -> list[dict]:
    """Each CUDA GPU here: name, class, multiprocessors, memory, compute capability."""
    out = []
    if not torch.cuda.is_available():
        return out
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append(
            {
                "index": i,
                "name": p.name,
                "class": gpu_class(p.name),
                "multiprocessors": p.multi_processor_count,
                "memory_gib": round(p.total_memory / (1 << 30), 1),
                "capability": f"{p.major}.{p.minor}",
                "l2_mib": round(getattr(p, "L2_cache_size", 0) / (1 << 20), 1),
            }
        )
    return out


def local_inventory() -> Inventory:
    """The devices of this machine."""
    cpu = local_cpu()
    classes = {
        "cpu": DeviceClass(
            "cpu",
            "cpu",
            1,
            cpu_facts(cpu["cores"], cpu["memory_gib"], cpu["isa"] == "avx512", cpu["model"]),
            ("local",),
            True,
        )
    }
    for gpu in local_gpus():
        name = gpu["class"]
        facts = GPU_FACTS.get(name) or DeviceFacts(
            gpu["name"], 20.0, 20.0, 20.0, 1000.0, gpu["memory_gib"], gpu["l2_mib"]
        )
        if name in classes:
            prev = classes[name]
            classes[name] = DeviceClass(name, "gpu", prev.count + 1, prev.facts, prev.nodes, True)
        else:
            classes[name] = DeviceClass(name, "gpu", 1, facts, ("local",), True)
    return Inventory(classes, source="local")


def cluster_inventory(cluster) -> Inventory:
    """The devices a declared cluster file describes (`hetforge.spec.cluster.Cluster`)."""
    cores = sum(n.cpu.cores * n.count for n in cluster.nodes)
    mem = min(n.cpu.memory_gib for n in cluster.nodes)
    cpu_nodes = sum(n.count for n in cluster.nodes)
    avx512 = all(n.cpu.avx512 for n in cluster.nodes)
    per_node_cores = max(1, cores // cpu_nodes)
    classes = {
        "cpu": DeviceClass(
            "cpu", "cpu", cpu_nodes, cpu_facts(per_node_cores, mem, avx512), tuple(n.name for n in cluster.nodes)
        )
    }
    for node in cluster.nodes:
        for group in node.gpus:
            prev = classes.get(group.model)
            count = group.count * node.count + (prev.count if prev else 0)
            nodes = (prev.nodes if prev else ()) + (node.name,)
            classes[group.model] = DeviceClass(group.model, "gpu", count, GPU_FACTS[group.model], nodes)
    host_link = min(n.host_link_gbps for n in cluster.nodes) / 8
    return Inventory(
        classes,
        host_link_gbs=host_link,
        network_gbs=cluster.interconnect.bandwidth_gbps / 8,
        network_latency_ms=cluster.interconnect.latency_us / 1e3,
        source=f"cluster:{cluster.name}",
    )


CPU_CLASS_RESOURCE = "cpu_class:"  # a CPU node's class, as a Ray custom resource: cpu_class:<name>


def ray_inventory(address: str | None = None) -> Inventory:
    """The devices of a running Ray cluster: CPUs per node (by `cpu_class:` when nodes declare one), and GPUs
    by their accelerator_type resource."""
    try:
        import ray
    except ImportError as err:
        raise RuntimeError("planning for a Ray cluster needs the `serving` extra (ray)") from err
    started = not ray.is_initialized()
    if started:
        ray.init(address=address or "auto", logging_level="ERROR", log_to_driver=False)
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
    finally:
        if started:
            ray.shutdown()
    return inventory_of_nodes(nodes)


def inventory_of_nodes(nodes: list[dict]) -> Inventory:
    """The inventory of Ray nodes as `ray.nodes()` lists them."""
    classes: dict[str, DeviceClass] = {}
    declared: dict[str, list[dict]] = {}
    for n in nodes:
        for key in n["Resources"]:
            if key.startswith(CPU_CLASS_RESOURCE):
                declared.setdefault(key.removeprefix(CPU_CLASS_RESOURCE), []).append(n)
    groups = declared or {"cpu": nodes}
    for name, members in sorted(groups.items()):
        cores = sum(int(n["Resources"].get("CPU", 0)) for n in members) or 1
        mem = min((n["Resources"].get("memory", 8 << 30) / (1 << 30) for n in members), default=8.0)
        classes[name] = DeviceClass(
            name,
            "cpu",
            len(members),
            cpu_facts(max(1, cores // len(members)), mem, name=name),
            tuple(n["NodeID"][:8] for n in members),
            resource=CPU_CLASS_RESOURCE + name if declared else None,
        )
    for n in nodes:
        gpus = int(n["Resources"].get("GPU", 0))
        kinds = [k.split(":", 1)[1] for k in n["Resources"] if k.startswith("accelerator_type:")]
        if gpus:
            name = gpu_class(kinds[0]) if kinds else "cuda"
            facts = GPU_FACTS.get(name, DeviceFacts(name, 20.0, 20.0, 20.0, 1000.0, 16.0, 4.0))
            prev = classes.get(name)
            classes[name] = DeviceClass(
                name,
                "gpu",
                gpus + (prev.count if prev else 0),
                facts,
                (prev.nodes if prev else ()) + (n["NodeID"][:8],),
            )
    return Inventory(classes, source="ray")
