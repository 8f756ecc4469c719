"""Shared test helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET when kernels are defined (at import): without a GPU, define them for
# the interpreter. They run on CPU tensors only where a test also sets HETFORGE_KERNELS_ON_CPU=1
# (the `triton_on_cpu` fixture); everything else takes the kernels' torch paths, as users' CPUs do.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def run_cli(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """`hetforge ARGS` in a fresh interpreter, as a user runs it."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "hetforge.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=full_env
    )


@pytest.fixture
def examples() -> Path:
    return EXAMPLES


@pytest.fixture
def triton_on_cpu(monkeypatch) -> str:
    """The device kernel tests run on: CUDA when present, else the CPU under Triton's interpreter."""
    if torch.cuda.is_available():
        return "cuda"
    monkeypatch.setenv("HETFORGE_KERNELS_ON_CPU", "1")
    return "cpu"
