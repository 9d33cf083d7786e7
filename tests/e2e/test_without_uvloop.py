"""The agent where uvloop and the compiled codec do not exist (Windows, or a platform without
a C compiler): plain asyncio and the pure-Python codec serve, ``check`` says so, and bytes
flow through a real relay. uvloop is hidden by a module on PYTHONPATH that fails to import,
as a missing package does; TUNNEL_PURE_PYTHON=1 selects the pure codec."""

from __future__ import annotations

import json
import os
import socket
import subprocess

from tests.helpers.processes import PY, ROOT, _env, connect, recv_all


def test_agent_serves_on_plain_asyncio_and_the_pure_codec(relay, agents, service_factory, tmp_path):
    shim = tmp_path / "no-uvloop"
    shim.mkdir()
    (shim / "uvloop.py").write_text("raise ImportError('uvloop is not available on this platform')\n")
    service = service_factory("echo")
    customer = relay.create_customer("acme")
    token = relay.jwt("--customer-id", customer)
    extra = {"PYTHONPATH": str(shim), "TUNNEL_PURE_PYTHON": "1"}

    out = subprocess.run([PY, "-m", "agent", "check", "--output", "json"], capture_output=True, text=True, timeout=120,
                         cwd=ROOT, env=_env(RELAY_URL=f"auto://127.0.0.1:{relay.port}", RELAY_CA_FILE=relay.ca_file,
                                            NAME="db", APP_HOST="127.0.0.1", APP_PORT=service.port,
                                            REGISTRATION_JWT=token, **extra))
    report = json.loads(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    runtime = next(c for c in report["checks"] if c["name"] == "runtime")["detail"]
    assert "asyncio (uvloop is not installed)" in runtime and "python frame codec" in runtime
    assert "pure-Python per-message path" in runtime

    for transport in ("wss", "quic"):
        name = f"db-{transport}"
        agents.start(f"{transport}://127.0.0.1:{relay.port}", token, name, service.port, ca_file=relay.ca_file,
                     **extra)
        relay.wait_available(customer, name)
        payload = os.urandom(1 << 20)
        with connect(relay.endpoint(customer, name)) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            assert recv_all(s) == payload
