#!/usr/bin/env bash
# The test command: set up .venv (and, as root on Debian, a Prometheus server for the serving
# tests), then run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
if ! command -v prometheus >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus) >/dev/null 2>&1 \
    || echo "note: could not install Debian's prometheus; the Prometheus test will skip (or fail under CI)"
fi
exec .venv/bin/python -m pytest "$@"
