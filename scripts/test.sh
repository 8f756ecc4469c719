#!/usr/bin/env bash
# The test command: set up .venv (and, as root or with sudo on Debian, a Prometheus server for the serving
# tests), then run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
if ! command -v prometheus >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then as_root=""; elif sudo -n true 2>/dev/null; then as_root="sudo -n"; else as_root="none"; fi
  if [ "$as_root" != none ]; then
    ($as_root apt-get update -qq && $as_root apt-get install -y -qq --no-install-recommends prometheus) >/dev/null 2>&1 \
      || echo "note: could not install Debian's prometheus; the Prometheus test will skip (or fail under CI)"
  else
    echo "note: installing Debian's prometheus needs root or sudo; the Prometheus test will skip (or fail under CI)"
  fi
fi
exec .venv/bin/python -m pytest "$@"
