#!/usr/bin/env bash
# Quick start: set up, then run a relay, a sample private service and an agent on the
# embedded defaults, with traffic through them. Extra arguments go to scripts/demo.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --python-only
# The virtual environment setup.sh made: its python, and tunnel-relay/tunnel-agent on PATH.
VENV="${VENV:-.venv}"
[[ "$VENV" = /* ]] || VENV="$PWD/$VENV"
export PATH="$VENV/bin:$PATH"
exec "$VENV/bin/python" scripts/demo.py "$@"
