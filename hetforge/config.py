"""Environment knobs, one typed getter each; units are in the names.

Every variable is optional. Read at call time, not import time, so tests can set them.
"""

from __future__ import annotations

import os
from pathlib import Path


def _int(name: str, default: int, lo: int, hi: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f'Got "{raw}" for {name}: an integer from {lo} to {hi}.') from None
    if not lo <= value <= hi:
        raise ValueError(f'Got "{raw}" for {name}: an integer from {lo} to {hi}.')
    return value


def spec_max_bytes() -> int:
    """Largest pipeline file the loader reads (HETFORGE_SPEC_MAX_BYTES, default 1 MiB)."""
    return _int("HETFORGE_SPEC_MAX_BYTES", 1 << 20, 1024, 64 << 20)


def spec_max_depth() -> int:
    """Deepest YAML nesting the loader accepts (HETFORGE_SPEC_MAX_DEPTH, default 32)."""
    return _int("HETFORGE_SPEC_MAX_DEPTH", 32, 4, 256)


def spec_max_nodes() -> int:
    """Most YAML nodes a file may expand to, aliases counted (HETFORGE_SPEC_MAX_NODES, default 100k)."""
    return _int("HETFORGE_SPEC_MAX_NODES", 100_000, 100, 10_000_000)


def home_dir() -> Path:
    """Where hetforge keeps its state: profiles and the kernel registry (HETFORGE_HOME, default ~/.hetforge)."""
    return Path(os.environ.get("HETFORGE_HOME") or Path.home() / ".hetforge")


def llm_endpoint() -> dict | None:
    """The OpenAI-compatible endpoint of the LLM agents, or None when none is configured.

    HETFORGE_LLM_BASE_URL (else OPENAI_BASE_URL), HETFORGE_LLM_MODEL (required), HETFORGE_LLM_API_KEY
    (else OPENAI_API_KEY; a local server may need none).
    """
    base_url = os.environ.get("HETFORGE_LLM_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
    model = os.environ.get("HETFORGE_LLM_MODEL")
    if not model or not (base_url or os.environ.get("OPENAI_API_KEY")):
        return None
    key = os.environ.get("HETFORGE_LLM_API_KEY") or os.environ.get("OPENAI_API_KEY") or "none"
    return {"base_url": base_url, "model": model, "api_key": key}


def llm_timeout_s() -> int:
    """Seconds one LLM request may take (HETFORGE_LLM_TIMEOUT_S, default 120)."""
    return _int("HETFORGE_LLM_TIMEOUT_S", 120, 1, 3600)


def kernels_on_cpu() -> bool:
    """Run the Triton kernels on CPU tensors through Triton's interpreter (tests): both
    TRITON_INTERPRET=1 (read by Triton when kernels are defined) and HETFORGE_KERNELS_ON_CPU=1.
    Otherwise CPU tensors take each kernel's torch path."""
    return os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("HETFORGE_KERNELS_ON_CPU") == "1"


def confine_workers() -> bool:
    """Confine verification workers (Landlock, seccomp, process and CPU limits; HETFORGE_CONFINE, default 1).
    Turn off only to debug a worker: candidates then run with the judge's rights."""
    return os.environ.get("HETFORGE_CONFINE", "1") != "0"


def worker_cpu_s() -> int:
    """CPU seconds a verification worker may use before SIGXCPU (HETFORGE_WORKER_CPU_S, default 1800)."""
    return _int("HETFORGE_WORKER_CPU_S", 1800, 10, 86_400)


def worker_max_procs() -> int:
    """Processes and threads a verification worker may have at once (HETFORGE_WORKER_MAX_PROCS, default 512)."""
    return _int("HETFORGE_WORKER_MAX_PROCS", 512, 16, 65_536)


def compile_cache_dir() -> Path:
    """Compile caches shared by workers of trusted candidates (hetforge's own recipes and kernels)."""
    return home_dir() / "cache" / "compile"


def prometheus_url() -> str | None:
    """A Prometheus server that scrapes every node of the deployment (HETFORGE_PROMETHEUS_URL). When set, the
    re-optimization controller reads stage metrics through its HTTP API instead of this node's metrics files,
    so it sees replicas on every node of a cluster."""
    return os.environ.get("HETFORGE_PROMETHEUS_URL") or None


def api_token() -> str | None:
    """The API token of the serving routes that need one (HETFORGE_API_TOKEN; `NAME:TOKEN` names its holder for
    the audit trail). When unset, the token file (`api_token_file`) holds it."""
    return os.environ.get("HETFORGE_API_TOKEN") or None


def api_token_file() -> Path:
    """The file of API tokens, one `TOKEN` or `NAME:TOKEN` a line (HETFORGE_API_TOKEN_FILE, default
    $HETFORGE_HOME/api-token; `hetforge serve` creates it with one new token when neither it nor
    HETFORGE_API_TOKEN exists)."""
    return Path(os.environ.get("HETFORGE_API_TOKEN_FILE") or home_dir() / "api-token")
