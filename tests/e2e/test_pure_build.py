"""The pure-Python build end to end (``TUNNEL_PURE_PYTHON=1`` for every process): two relays on
one PostgreSQL, an agent linked to the second only, exact bytes through its endpoint on both
relays (the first forwards to the second). The rest of the e2e suite runs the compiled build."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.helpers.cluster import ENV, aliases_work
from tests.helpers.processes import Relay, connect, recv_all

PURE = {"TUNNEL_PURE_PYTHON": "1"}


def roundtrip(addr: tuple[str, int], payload: bytes) -> bytes:
    with connect(addr) as s:
        s.sendall(payload)
        s.shutdown(1)  # SHUT_WR: a half-close carried through
        return recv_all(s)


def compiled_modules_loaded(pid: int) -> list[str]:
    """The project's extension modules mapped into process ``pid``."""
    with open(f"/proc/{pid}/maps") as maps:
        return sorted({line.split()[-1] for line in maps if "/tunnel/_compiled/" in line or "/tunnel/_frames." in line})


def test_relays_and_agent_on_the_pure_build(tmp_path, postgres_url, agents, service_factory):
    if not aliases_work():
        pytest.skip("127.0.0.2 is not a loopback address here")
    env = {"RELAY_DATABASE_URL": postgres_url, **ENV, **PURE}
    first = Relay(tmp_path, host="127.0.0.1", state_dir=tmp_path / "first").start(**env)
    try:
        customer = first.create_customer("acme")
        token = first.jwt("--customer-id", customer)
        shutil.copytree(first.state_dir, tmp_path / "second", ignore=shutil.ignore_patterns("admin.json"))
        second = Relay(tmp_path, host="127.0.0.2", state_dir=tmp_path / "second").start(**env)
        try:
            service = service_factory("drain-then-echo")
            agent = agents.start(second.url, token, "db", service.port, ca_file=second.ca_file, RELAY_LINKS="1", **PURE)
            second.wait_available(customer, "db")
            first.wait_available(customer, "db")
            payload = os.urandom(512 * 1024)
            for relay in (second, first):  # held link, then a forwarded hop
                assert roundtrip(relay.endpoint(customer, "db"), payload) == payload
            for proc in (first.proc, second.proc, agent):
                assert compiled_modules_loaded(proc.proc.pid) == [], f"{proc.name} loaded compiled modules"
                assert "Traceback" not in proc.log()
        finally:
            second.stop()
    finally:
        first.stop()
