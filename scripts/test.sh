#!/usr/bin/env bash
# Set up (idempotently) and run the whole test suite, as CI does. Without arguments the unit,
# adapter and Link contract tests also run on the pure-Python twins of the compiled modules
# (TUNNEL_PURE_PYTHON=1: the codec, the session, the WebSocket carrier, the link, the bridge;
# about 45 s; the QUIC adapter tests touch none of them but the shared policy, which the
# contract suite covers); tests/e2e/test_pure_build.py runs relays and an agent on the twins
# in every run. `--pure` runs that pass alone. Arguments (test paths, pytest options) select
# what runs, once, compiled.
# setup.sh re-runs the build, so an edited .py of the compiled path never runs stale here; it
# installs the optional QUIC engine qh3 too, so that its cases (carrier `quic-qh3`) run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --qh3
# The virtual environment setup.sh made: its python runs the tests, and the tests start their
# processes with it (sys.executable).
VENV="${VENV:-.venv}"
[[ "$VENV" = /* ]] || VENV="$PWD/$VENV"
export PATH="$VENV/bin:$PATH"
if (($# == 0)) || [ "$1" = --pure ]; then
  TUNNEL_PURE_PYTHON=1 "$VENV/bin/python" -m pytest -q -ra tests/unit tests/adapters tests/contract --ignore=tests/unit/relay \
    --ignore=tests/adapters/test_quic.py
  (($# == 0)) || exit 0
fi
exec "$VENV/bin/python" -m pytest -q -ra "$@" tests
