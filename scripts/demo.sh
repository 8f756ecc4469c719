#!/usr/bin/env bash
# The main job on the embedded default (local, CPU): set up .venv, then run `hetforge demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/hetforge demo "$@"
