#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 machine: system packages the tests and the
# benchmarks use, then the project itself (builds the Cython codec and tunnel.ops._malloc) with
# its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

# postgresql: the tests start their own server from its binaries (/usr/lib/postgresql/*/bin),
# as the package's "postgres" user when run as root (runuser, from util-linux).
# haproxy: the TCP load balancer of the cluster deployment example (deploy/cluster), which
# tests/e2e/test_deploy_cluster.py runs in front of three relays.
# stunnel4: bench/e2e.py's C TLS tunnel without multiplexing, the peer that shows what TLS alone costs.
DEB_PACKAGES=(openssh-server openssh-client iperf3 nginx-light postgresql postgresql-client
              redis-server redis-tools wrk curl iptables iproute2 procps tinyproxy
              systemd util-linux prometheus gcc libc6-dev haproxy stunnel4)
missing=()
[ "${1:-}" = "--python-only" ] && DEB_PACKAGES=()
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

# pip's notices (root user, editable installs) are shown only when an install fails.
pip_log=$(mktemp)
trap 'rm -f "$pip_log"' EXIT
python3 -m pip install -q --upgrade pip "setuptools>=77" >"$pip_log" 2>&1 \
  || { cat "$pip_log"; exit 1; }  # setuptools 77: the SPDX licence (python setup.py build_ext too)
python3 -m pip install -q -e ".[test]" >"$pip_log" 2>&1 || { cat "$pip_log"; exit 1; }
python3 -c "import tunnel.codec as f, tunnel.ops._malloc; assert f.IMPLEMENTATION == 'cython', f.IMPLEMENTATION"
