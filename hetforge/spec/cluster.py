"""Declared cluster files: hardware to plan for that need not be here (YAML -> pydantic)."""

from __future__ import annotations

from pathlib import Path

from pydantic import ConfigDict, Field, field_validator, model_validator

from hetforge.spec.load import load_document, read_limited
from hetforge.spec.models import GPU_MODELS, NAME_PATTERN, _Spec, normalize_device


class GpuGroup(_Spec):
    """GPUs of one model in each node of a node type."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="a gpus entry")

    model: str = Field(description="GPU model: " + ", ".join(GPU_MODELS) + ".")
    count: int = Field(default=1, ge=1, le=64, description="GPUs of this model per node.")

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        try:
            name = normalize_device(value)
        except ValueError:
            name = "cpu"
        if name in ("auto", "cpu", "cuda"):
            raise ValueError("a GPU model: " + ", ".join(GPU_MODELS))
        return name


class CpuSpec(_Spec):
    """The host CPU of each node."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="a cpu block")

    cores: int = Field(ge=1, le=4096, description="Physical cores per node.")
    memory_gib: float = Field(gt=0, le=65536, description="Host memory per node, GiB.")
    avx512: bool = Field(default=True, description="Whether the CPU has AVX-512 (doubles the vector peak).")


class NodeType(_Spec):
    """A kind of node and how many of it the cluster has."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="a node type")

    name: str = Field(pattern=NAME_PATTERN, description="Node type name.")
    count: int = Field(default=1, ge=1, le=10_000, description="Nodes of this type.")
    cpu: CpuSpec = Field(description="Host CPU and memory.")
    gpus: list[GpuGroup] = Field(default_factory=list, max_length=8, description="GPUs per node.")
    host_link_gbps: float = Field(
        default=200.0, gt=0, le=100_000, description="CPU<->GPU bandwidth in Gbit/s (PCIe Gen4 x16: ~200)."
    )


class Interconnect(_Spec):
    """The network between nodes."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="an interconnect block")

    bandwidth_gbps: float = Field(default=100.0, gt=0, le=100_000, description="Bandwidth between nodes, Gbit/s.")
    latency_us: float = Field(default=20.0, ge=0, le=1_000_000, description="One-way latency between nodes, µs.")


class Cluster(_Spec):
    """Hardware to plan for: node types with their CPUs and GPUs, and the network between them."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="a cluster")

    name: str = Field(pattern=NAME_PATTERN, description="Cluster name.")
    nodes: list[NodeType] = Field(min_length=1, max_length=256, description="Node types.")
    interconnect: Interconnect = Field(default_factory=Interconnect, description="Network between nodes.")

    @model_validator(mode="after")
    def _unique(self) -> Cluster:
        names = [n.name for n in self.nodes]
        if len(names) != len(set(names)):
            raise ValueError("node type names must be unique")
        return self


def load_cluster(path: str | Path) -> Cluster:
    """The validated cluster file; SpecError with located errors, SpecIOError if unreadable."""
    cluster, _ = load_document(read_limited(path), str(path), Cluster)
    return cluster  # type: ignore[return-value]


__all__ = ["Cluster", "CpuSpec", "GpuGroup", "Interconnect", "NodeType", "load_cluster"]
