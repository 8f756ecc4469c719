#!/usr/bin/env bash
# The test command: set up .venv (and, as root or with sudo on Debian, a Prometheus server and a headless
# Chromium for the serving tests, PostgreSQL for the state-store tests), then run the whole test suite.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
missing=""
command -v prometheus >/dev/null 2>&1 || missing="$missing prometheus"
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
# the state-store tests start a throwaway PostgreSQL cluster with Debian's server binaries
ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || command -v pg_ctl >/dev/null 2>&1 || missing="$missing postgresql"
if [ -n "$missing" ] && command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then as_root=""; elif sudo -n true 2>/dev/null; then as_root="sudo -n"; else as_root="none"; fi
  if [ "$as_root" != none ]; then
    ($as_root apt-get update -qq && $as_root apt-get install -y -qq --no-install-recommends $missing) >/dev/null 2>&1 \
      || echo "note: could not install Debian's$missing; the tests that need them will skip (or fail under CI)"
  else
    echo "note: installing Debian's$missing needs root or sudo; the tests that need them will skip (or fail under CI)"
  fi
fi
# Lint and format first (configured in pyproject.toml): a finding fails the run before the tests start.
.venv/bin/ruff check hetforge tests bench scripts examples
.venv/bin/ruff format --check --quiet hetforge tests bench scripts examples
exec .venv/bin/python -m pytest "$@"
