#!/usr/bin/env bash
# Set up (idempotently) and run the whole test suite, as CI does. Without arguments the unit
# tests also run against the pure-Python twin of the codec (TUNNEL_PURE_PYTHON=1, about 10 s;
# not the relay's control-plane tests, which no codec reaches); arguments (test paths, pytest
# options) select what runs, once, with the compiled codec.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if (($# == 0)); then
  TUNNEL_PURE_PYTHON=1 python3 -m pytest -q -ra --ignore=tests/unit/relay tests/unit
fi
exec python3 -m pytest -q -ra "$@" tests
