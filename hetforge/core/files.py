"""File digests for fingerprints: a checkpoint or a model folder's weights is part of what a variant was verified for."""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks (checkpoints run to gigabytes). Computed once per process
    for a file whose size and modification time stay the same: every load of a stage's problem asks again."""
    st = os.stat(path)
    return _digest(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
