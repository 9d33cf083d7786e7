"""Strings an agent sends (``auth``'s version, hostname, instance) are validated at auth and
never reach the operator raw: refused with a clear error when they hold anything but their
documented characters, escaped in every log line, and escaped by ``resources list``
(tables and JSON) whatever the admin API answers.

Found in a hostile review: a version with a newline forged relay log lines, and escape
sequences reached the terminal through ``resources list --extended``. About 5 s."""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import socket
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.faults.faultkit import FAST, register
from tests.helpers.processes import PY, ROOT, _env

FORGED = "2031-01-01T00:00:00.000Z INFO    relay: agent agt_forged registered"
BAD_AGENTS = {
    "version": {"version": "0.1.0\n" + FORGED},
    "hostname": {"hostname": "\x1b]0;owned\x07\x1b[2J"},
    "instance": {"instance": "x" * 65},
    "non-ASCII hostname": {"hostname": "hôte"},
}


def _raw(text: str) -> list[str]:
    """Non-printable characters in ``text`` other than line ends."""
    return [c for c in text if not c.isprintable() and c != "\n"]


def test_bad_agent_strings_are_refused_and_never_logged_raw(relay):
    customer = relay.create_customer("acme")
    token = relay.jwt("--customer-id", customer)

    async def main():
        answers = {}
        for case, agent in BAD_AGENTS.items():
            _, rec = await register(relay, token, ["db"], **agent)
            answers[case] = rec
        return answers

    for case, rec in asyncio.run(main()).items():
        error = rec.first("error")
        assert error and error["code"] == "bad_request", (case, rec.messages)
        field = case.split()[-1]
        assert f"agent.{field} must be" in error["message"], error
        assert not _raw(error["message"]), error
        assert rec.first("registered") is None
    log = relay.proc.log()
    assert not _raw(log), sorted(set(_raw(log)))
    assert not any(line.startswith("2031-") for line in log.splitlines()), "a forged log line"
    assert relay.resource(customer, "db") is None


class _FakeAdmin(BaseHTTPRequestHandler):
    """An admin API answering with agent strings nobody validated (an older relay, a bug)."""

    RESOURCES = [{
        "id": "res_x", "name": "db\u202eevil", "customer_id": "cus_x", "status": "AVAILABLE",
        "endpoint": "127.0.0.1:1", "agents": 1,
        "agents_detail": [{"agent_id": "agt_1", "transport": "wss", "address": "192.0.2.1:1",
                           "version": "1.0\x1b[31mRED", "hostname": "h\x9b2J\r\nforged",
                           "connected_since": "2031-01-01T00:00:00Z", "bytes_sent": 1, "bytes_received": 2,
                           "active_streams": 0}],
    }]

    def do_GET(self):  # noqa: N802 - http.server's name
        body = json.dumps(self.RESOURCES).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_resources_list_never_prints_control_characters():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeAdmin)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        outputs = {}
        for fmt in ("table", "json"):
            out = subprocess.run([PY, "-m", "relay", "resources", "list", "--extended", "--output", fmt,
                                  "--admin-url", url], env=_env(RELAY_ADMIN_TOKEN="t"), capture_output=True,
                                 text=True, timeout=60, cwd=ROOT)
            assert out.returncode == 0, out.stderr
            outputs[fmt] = out.stdout
    finally:
        server.shutdown()
    for fmt, text in outputs.items():
        assert not _raw(text), (fmt, sorted(set(_raw(text))))
        assert "forged" in text and "\\x1b[31mRED" in text.replace("\\u001b", "\\x1b")
    assert json.loads(outputs["json"]) == _FakeAdmin.RESOURCES  # escaped, not altered


def _own_hostname(name: str):
    def enter() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(0x04000000) != 0:  # CLONE_NEWUTS
            os._exit(99)
        socket.sethostname(name)
    return enter


def test_a_real_agent_on_a_host_with_an_odd_name_registers(relay, agents, service_factory):
    """The agent sends a hostname the relay accepts, whatever the host is called."""
    probe = subprocess.run([PY, "-c", "pass"], preexec_fn=_own_hostname("probe"))
    if probe.returncode == 99:
        pytest.skip("cannot enter a UTS namespace here")
    service = service_factory("echo")
    customer = relay.create_customer("acme")
    token = relay.jwt("--customer-id", customer)
    agents.start(f"wss://127.0.0.1:{relay.port}", token, "db", service.port, ca_file=relay.ca_file,
                 preexec_fn=_own_hostname("odd\x1b[31mhost name"), **FAST)
    detail = relay.wait_available(customer, "db")["agents_detail"][0]
    assert detail["hostname"] == "odd--31mhost-name"
