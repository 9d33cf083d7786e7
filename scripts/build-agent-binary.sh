#!/usr/bin/env bash
# Build the single-file agent for Linux x86-64: dist/tunnel-agent (or $1), with PyInstaller.
#
#   bash scripts/build-agent-binary.sh [OUTPUT]
#
# Everything comes from PyPI: a private virtualenv (build/agent-binary/venv) gets PyInstaller
# and this project (its Cython codec compiled on the way, uvloop, aioquic, cryptography as
# wheels); PyInstaller bundles the agent, the Python runtime and those libraries into one
# executable that needs no Python on the target. The build is skipped when OUTPUT was built
# from the same sources (a sha256 over the agent's source files, this script and the
# pinned versions, kept in OUTPUT.sha256). About 1.5 minutes from scratch on a 2-core
# machine, most of it pip; 20 s when only the sources changed.
#
# Why PyInstaller and not Nuitka: bench/agent_binary.py, README "The single-file agent".
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${1:-dist/tunnel-agent}"
# The quick start's virtual environment when there is one (its Python has the venv module).
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
PYINSTALLER_VERSION="6.22.3"
WORK="build/agent-binary"

key=$( { cat "$0"; echo "$PYINSTALLER_VERSION"; "$PYTHON" -c 'import sys; print(sys.version)';
         find agent tunnel -name '*.py' -o -name '*.pyi' -o -name '*.pxd' | LC_ALL=C sort | xargs cat;
         cat _frames.pyx tunnel/ops/_malloc.c setup.py pyproject.toml; } | sha256sum | cut -d' ' -f1)
if [ -x "$OUT" ] && [ "$(cat "$OUT.sha256" 2>/dev/null)" = "$key" ]; then
  echo "$OUT is up to date (sources $key)"
  exit 0
fi

start=$(date +%s)
mkdir -p "$WORK" "$(dirname "$OUT")"
if [ ! -x "$WORK/venv/bin/pyinstaller" ]; then
  "$PYTHON" -m venv "$WORK/venv"
  "$WORK/venv/bin/pip" install -q --disable-pip-version-check "pyinstaller==$PYINSTALLER_VERSION"
fi
# The dependencies, then a fresh copy of the project (not editable: the binary must not
# point back here; forced: the version number does not change with the sources).
"$WORK/venv/bin/pip" install -q --disable-pip-version-check .
"$WORK/venv/bin/pip" install -q --disable-pip-version-check --force-reinstall --no-deps .

cat > "$WORK/tunnel_agent.py" <<'EOF'
import sys

from agent.cli import main

sys.exit(main())
EOF
# The relay, the test and build tools are never imported by the agent; tkinter and friends
# would only be dragged in by optional imports of the standard library. The compiled
# per-message path is found at run time (tunnel/_compiled/ first on its packages' __path__),
# which the analysis does not follow: it is added as it is installed.
compiled=$("$WORK/venv/bin/python" -I -c 'import tunnel; print(tunnel.COMPILED)')
"$WORK/venv/bin/pyinstaller" --onefile --noconfirm --clean --log-level WARN \
  --name tunnel-agent --distpath "$WORK/dist" --workpath "$WORK/work" --specpath "$WORK" \
  --exclude-module relay --exclude-module tkinter --exclude-module pytest --exclude-module setuptools \
  --collect-submodules aiofastnet \
  --add-data "$compiled:tunnel/_compiled" \
  "$WORK/tunnel_agent.py"
install -m 0755 "$WORK/dist/tunnel-agent" "$OUT"
echo "$key" > "$OUT.sha256"
# The binary must carry the compiled codec, uvloop and the TLS engine, not fall back to the slow paths
# (the check's runtime line says which it loaded; the rest of that check fails here).
env -i "$OUT" --version
runtime=$(env -i RELAY_URL=wss://127.0.0.1:1 REGISTRATION_JWT=a.b.c NAME=x APP_HOST=127.0.0.1 APP_PORT=1 \
          "$OUT" check --timeout 1 | grep '^PASS  runtime' || true)
case "$runtime" in
  *uvloop*"cython frame codec"*"TLS engine openssl"*"compiled per-message path"*) echo "$runtime" ;;
  *) echo "the binary lacks uvloop, the compiled codec, the TLS engine or the compiled per-message path: ${runtime:-no runtime line}" >&2
     rm -f "$OUT"; exit 1 ;;
esac
echo "built $OUT ($(du -h "$OUT" | cut -f1)) in $(( $(date +%s) - start )) s"
