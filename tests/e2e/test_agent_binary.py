"""The single-file agent (scripts/build-agent-binary.sh) on a host without Python: it answers
``--version``, runs ``check``, and serves traffic through a real relay.

The build is reused while the sources are unchanged (dist/tunnel-agent.sha256); from scratch
it takes about a minute. "Without Python": as root, the agent runs in a private mount
namespace where every Python installation (this interpreter's prefix, /usr/lib/python3*,
/usr/bin/python3*) is hidden under empty mounts, with an empty environment; elsewhere, with
an empty environment and a PATH without Python only.
"""

from __future__ import annotations

import glob
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys

import pytest

from tests.helpers.processes import ROOT, Proc, connect, recv_all

BINARY = ROOT / "dist" / "tunnel-agent"

# The first test builds the binary (about 40 s here, more where pip must download).
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def binary() -> str:
    if not (sys.platform == "linux" and os.uname().machine == "x86_64"):
        pytest.skip("the single-file build is for Linux x86-64")
    out = subprocess.run(["bash", str(ROOT / "scripts" / "build-agent-binary.sh"), str(BINARY)], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"build failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return str(BINARY)


def _can_hide_python() -> bool:
    return os.geteuid() == 0 and shutil.which("unshare") is not None


def _python_places() -> list[str]:
    places = {sys.base_prefix, sys.prefix, *glob.glob("/usr/lib/python3*"), *glob.glob("/usr/local/lib/python3*")}
    return sorted(p for p in places if os.path.isdir(p))


def without_python(argv: list[str], env: dict[str, str]) -> list[str]:
    """``argv`` run with nothing but ``env``, in a mount namespace where Python is absent."""
    assignments = [f"{k}={v}" for k, v in env.items()]
    if not _can_hide_python():
        return ["env", "-i", "PATH=/nonexistent", *assignments, *argv]
    hide = [f"mount -t tmpfs -o size=1m none {shlex.quote(p)}" for p in _python_places()]
    hide += [f"mount --bind /dev/null {shlex.quote(p)}" for p in glob.glob("/usr/bin/python*")
             + glob.glob("/usr/local/bin/python*") if os.path.isfile(p)]
    script = " && ".join(hide + [
        # Prove the point before running the agent: no interpreter is reachable.
        "! /usr/bin/python3 -c 1 2>/dev/null",
        f"! {shlex.quote(sys.executable)} -c 1 2>/dev/null",
        'exec env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@"',
    ])
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *assignments, *argv]


def test_version_without_python(binary):
    out = subprocess.run(without_python([binary, "--version"], {}), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "tunnel-agent 0.1.0"


def test_check_and_serve_without_python(binary, relay, service_factory, tmp_path):
    service = service_factory("echo")
    customer = relay.create_customer("acme")
    token = relay.jwt("--customer-id", customer)
    env = {"RELAY_URL": f"auto://127.0.0.1:{relay.port}", "RELAY_CA_FILE": relay.ca_file, "NAME": "db",
           "APP_HOST": "127.0.0.1", "APP_PORT": str(service.port), "REGISTRATION_JWT": token, "TMPDIR": str(tmp_path)}

    out = subprocess.run(without_python([binary, "check", "--output", "json"], env), capture_output=True, text=True,
                         timeout=120)
    report = json.loads(out.stdout)
    assert out.returncode == 0 and report["ok"], out.stdout + out.stderr
    runtime = next(c for c in report["checks"] if c["name"] == "runtime")["detail"]
    assert "single-file build" in runtime and "uvloop" in runtime and "cython frame codec" in runtime
    assert "TLS engine openssl (aiofastnet" in runtime
    assert "compiled per-message path" in runtime

    # Served over QUIC (auto:// would ride WSS): the binary carries aioquic too.
    env["RELAY_URL"] = f"quic://127.0.0.1:{relay.port}"
    agent = Proc("agent-binary", without_python([binary], env), os.environ.copy(), tmp_path / "agent-binary.log")
    agent.start()
    try:
        relay.wait_available(customer, "db")
        assert relay.resource(customer, "db")["agents_detail"][0]["transport"] == "quic"
        payload = os.urandom(1 << 20)
        for _ in range(3):
            with connect(relay.endpoint(customer, "db")) as s:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
                assert recv_all(s) == payload
    finally:
        assert agent.stop() == 0, agent.log()[-3000:]
