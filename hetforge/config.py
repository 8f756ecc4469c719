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
