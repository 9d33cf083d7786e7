#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 machine: system packages the tests and the
# benchmarks use, then a virtual environment (.venv, or $VENV) made from `python3` (or $PYTHON)
# that holds the project (builds the Cython codec and tunnel.ops._malloc) with its test extras,
# and aioquic's packet path compiled with Cython in place (scripts/build_aioquic.py).
# A virtual environment because Debian's own Python is externally managed (PEP 668): pip refuses
# to install into it. `--python-only` installs only what that needs (a C compiler, and for
# Debian's Python its venv module and headers). Every script after it runs $VENV/bin/python.
# `--qh3` (or TUNNEL_QUIC_ENGINE=qh3 in the environment) also installs the optional QUIC engine
# qh3 (pyproject.toml's `qh3` extra: abi3 wheels, nothing to build); without it qh3 is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
BASE_PYTHON="${PYTHON:-python3}"
WANT_QH3=""
for arg in "$@"; do [ "$arg" = "--qh3" ] && WANT_QH3=1; done
[ "${TUNNEL_QUIC_ENGINE:-}" = "qh3" ] && WANT_QH3=1

# postgresql: the tests start their own server from its binaries (/usr/lib/postgresql/*/bin),
# as the package's "postgres" user when run as root (runuser, from util-linux).
# haproxy: the TCP load balancer of the cluster deployment example (deploy/cluster), which
# tests/e2e/test_deploy_cluster.py runs in front of three relays.
# stunnel4: bench/e2e.py's C TLS tunnel without multiplexing, the peer that shows what TLS alone costs.
DEB_PACKAGES=(openssh-server openssh-client iperf3 nginx-light postgresql postgresql-client
              redis-server redis-tools wrk curl iptables iproute2 procps tinyproxy
              systemd util-linux prometheus gcc libc6-dev haproxy stunnel4)
missing=()
[ "${1:-}" = "--python-only" ] && DEB_PACKAGES=(gcc libc6-dev)
# Debian splits the venv module (with ensurepip) and the C headers out of python3.
if ! "$VENV/bin/python" -c '' 2>/dev/null && ! "$BASE_PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
  DEB_PACKAGES+=(python3-venv)
fi
if ! "$BASE_PYTHON" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null; then
  DEB_PACKAGES+=(python3-dev)
fi
for p in "${DEB_PACKAGES[@]+"${DEB_PACKAGES[@]}"}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The tests start their own servers on private ports; keep the packaged ones from squatting.
  for svc in nginx postgresql redis-server ssh tinyproxy prometheus; do
    $SUDO systemctl disable --now "$svc" >/dev/null 2>&1 || $SUDO service "$svc" stop >/dev/null 2>&1 || true
  done
fi

# The virtual environment, made once; made again when its Python no longer runs (the Python it
# was made from is gone).
if ! "$VENV/bin/python" -c '' 2>/dev/null; then
  rm -rf "$VENV"
  "$BASE_PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
compiled() { "$PY" -c "import tunnel.codec as f, tunnel.ops._malloc; assert f.IMPLEMENTATION == 'cython', f.IMPLEMENTATION"; }
# The install (an editable one: the .py files are used in place) is redone only when what it
# builds or pins changed: the compiled sources (.pyx, .c, each .pxd and the .py beside it),
# setup.py or pyproject.toml. It takes a minute or more; the check takes a moment.
key=$( { "$PY" -c 'import sys; print(sys.version)'; cat pyproject.toml setup.py _frames.pyx tunnel/ops/_malloc.c;
         find tunnel -name '*.pxd' | LC_ALL=C sort | while read -r pxd; do cat "$pxd" "${pxd%.pxd}.py"; done; } \
       | sha256sum | cut -d' ' -f1)
# aioquic's hot modules compiled in the venv: its own stamp makes this a moment once done (or
# once it fell back to pure Python, which it says); the first time about 80 s of CPU, or a copy
# from ~/.cache/tunnel-build/ when another venv on this machine built the same.
build_aioquic() { "$PY" scripts/build_aioquic.py; }
# The optional QUIC engine, at the version the extra pins, only when asked (a moment once there).
optional_engines() {
  [ -n "$WANT_QH3" ] || return 0
  local pin
  pin=$("$PY" -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["qh3"])')
  "$PY" -c 'import sys; from importlib.metadata import version; sys.exit(version("qh3") != sys.argv[1].split("==")[1])' \
    "$pin" 2>/dev/null && return 0
  "$PY" -m pip install -q --disable-pip-version-check "$pin"
}
if [ "$(cat "$VENV/.installed" 2>/dev/null)" = "$key" ] && compiled 2>/dev/null; then
  build_aioquic
  optional_engines
  exit 0
fi
# pip's notices (root user, editable installs) are shown only when an install fails.
pip_log=$(mktemp)
trap 'rm -f "$pip_log"' EXIT
"$PY" -m pip install -q --disable-pip-version-check --upgrade pip "setuptools>=77" >"$pip_log" 2>&1 \
  || { cat "$pip_log"; exit 1; }  # setuptools 77: the SPDX licence (python setup.py build_ext too)
"$PY" -m pip install -q --disable-pip-version-check -e ".[test,build]" >"$pip_log" 2>&1 || { cat "$pip_log"; exit 1; }
compiled
echo "$key" > "$VENV/.installed"
build_aioquic
optional_engines
