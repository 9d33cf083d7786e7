"""The working tunnel, end to end: real relay and agent processes, real sockets, loopback."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers.processes import Relay, connect, recv_all, wait_until


def _setup(relay, agents, service, transport, name="db", customer=None):
    customer = customer or relay.create_customer("acme")
    token = relay.jwt("--customer-id", customer)
    agent = agents.start(f"{transport}://127.0.0.1:{relay.port}", token, name, service.port, ca_file=relay.ca_file)
    relay.wait_available(customer, name)
    return customer, token, agent


def test_exact_bytes_with_half_close_from_client(relay, agents, service_factory, transport):
    service = service_factory("drain-then-echo")
    customer, _, _ = _setup(relay, agents, service, transport)
    payload = os.urandom(8 * 1024 * 1024 + 17)
    with connect(relay.endpoint(customer, "db")) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)  # the service sees EOF only through our half-close
        assert recv_all(s) == payload


def test_exact_bytes_with_half_close_from_service(relay, agents, service_factory, transport):
    greeting = os.urandom(3 * 1024 * 1024 + 5)
    service = service_factory("speak-first", greeting)
    customer, _, _ = _setup(relay, agents, service, transport)
    upload = os.urandom(5 * 1024 * 1024 + 3)
    with connect(relay.endpoint(customer, "db")) as s:
        assert recv_all(s) == greeting  # the service half-closed; our direction stays open
        s.sendall(upload)
        s.shutdown(socket.SHUT_WR)
        assert s.recv(1) == b""
    expected = hashlib.sha256(upload).hexdigest()
    wait_until(lambda: expected in service.record.received.values(), 20, "the service to record the upload")
    # The agent's health check (one connection opened and closed at its start) may be recorded
    # too, as a connection that sent nothing; the upload arrived once, whole.
    nothing = hashlib.sha256(b"").hexdigest()
    assert [d for d in service.record.received.values() if d != nothing] == [expected]


def test_many_parallel_streams(relay, agents, service_factory, transport):
    service = service_factory("echo")
    customer, _, _ = _setup(relay, agents, service, transport)
    addr = relay.endpoint(customer, "db")

    def one(i: int) -> bool:
        data = os.urandom(32 * 1024 + i)
        with connect(addr) as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            return recv_all(s) == data

    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(one, range(200)))
    assert all(results)


def test_status_follows_agents_and_new_streams_fail_over(relay, agents, service_factory, transport):
    service = service_factory("echo")
    customer = relay.create_customer("acme")
    token = relay.jwt("--customer-id", customer)
    url = f"{transport}://127.0.0.1:{relay.port}"
    first = agents.start(url, token, "db", service.port, ca_file=relay.ca_file)
    relay.wait_available(customer, "db", agents=1)
    second = agents.start(url, token, "db", service.port, ca_file=relay.ca_file)
    row = relay.wait_available(customer, "db", agents=2)
    assert {a["transport"] for a in row["agents_detail"]} == {transport}
    addr = relay.endpoint(customer, "db")

    first.kill()
    wait_until(lambda: relay.resource(customer, "db")["agents"] == 1, 30, "the killed agent to be dropped")
    for _ in range(5):  # every new connection reaches the remaining agent
        with connect(addr) as s:
            s.sendall(b"ping")
            s.shutdown(socket.SHUT_WR)
            assert recv_all(s) == b"ping"

    second.stop()
    wait_until(lambda: relay.resource(customer, "db")["status"] == "UNAVAILABLE", 30, "UNAVAILABLE")
    with pytest.raises((ConnectionResetError, BrokenPipeError)):  # with no agent: refused at once
        with connect(addr) as s:  # (on loopback the reset may even beat connect's return)
            s.sendall(b"x")
            assert s.recv(1) == b"", "a connection with no agent behind it must not get data"


@pytest.mark.parametrize("stop", ["killed", "stopped"])
def test_relay_killed_and_restarted_agent_returns_without_restart(relay, agents, service_factory, transport, stop):
    """SIGKILL: no goodbye to the agent. SIGTERM: the lone relay drains, telling its agent so
    first (the agent once waited for it to stop draining and never linked again)."""
    service = service_factory("echo")
    customer, _, agent = _setup(relay, agents, service, transport)
    endpoint = relay.endpoint(customer, "db")
    if stop == "killed":
        relay.proc.kill()
    else:
        relay.stop()
    relay.start()
    relay.wait_available(customer, "db", timeout=60)
    assert relay.endpoint(customer, "db") == endpoint  # endpoint ports are kept across restarts
    assert agent.alive()
    with connect(endpoint) as s:
        s.sendall(b"after restart")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"after restart"


def test_rotation_drops_old_agents(relay, agents, service_factory, transport):
    service = service_factory("echo")
    customer, old_token, old_agent = _setup(relay, agents, service, transport)
    resource_id = relay.resource(customer, "db")["id"]
    new_token = relay.jwt("--customer-id", customer, "--resource-id", resource_id, "--rotate")
    wait_until(lambda: not old_agent.alive(), 30, "the old agent to be dropped and exit")
    assert old_agent.proc.returncode == 3
    assert "revoked" in old_agent.log()
    assert relay.resource(customer, "db")["status"] == "UNAVAILABLE"

    again = agents.start(f"{transport}://127.0.0.1:{relay.port}", old_token, "db", service.port, ca_file=relay.ca_file)
    wait_until(lambda: not again.alive(), 30, "the agent with the revoked token to exit")
    assert again.proc.returncode == 3

    agents.start(f"{transport}://127.0.0.1:{relay.port}", new_token, "db", service.port, ca_file=relay.ca_file)
    relay.wait_available(customer, "db")


def _signed(relay, **claims) -> str:
    import jwt
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key((relay.state_dir / "signing-key.pem").read_bytes(), None)
    now = int(time.time())
    body = {"iss": "tunnel-relay", "aud": "tunnel-agent", "iat": now, "nbf": now, "exp": now + 3600,
            "jti": "t" + str(now), "gen": 0, "org": False}
    body.update(claims)
    return jwt.encode(body, key, algorithm="EdDSA")


def _forged(customer: str) -> str:
    import jwt
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    now = int(time.time())
    return jwt.encode({"iss": "tunnel-relay", "aud": "tunnel-agent", "sub": customer, "iat": now, "nbf": now,
                       "exp": now + 3600, "jti": "forged", "gen": 0, "org": False},
                      Ed25519PrivateKey.generate(), algorithm="EdDSA")


@pytest.mark.parametrize("kind", ["garbage", "forged", "expired", "other-customer", "alg-none"])
def test_bad_registration_tokens_are_refused_and_create_nothing(relay, agents, service_factory, kind):
    service = service_factory("echo")
    victim = relay.create_customer("victim")
    victim_token = relay.jwt("--customer-id", victim)
    agents.start(f"wss://127.0.0.1:{relay.port}", victim_token, "db", service.port, ca_file=relay.ca_file)
    relay.wait_available(victim, "db")
    attacker = relay.create_customer("attacker")
    victim_rid = relay.resource(victim, "db")["id"]
    before = relay.resources()
    token = {
        "garbage": "not-a-jwt",
        "forged": _forged(victim),
        "expired": _signed(relay, sub=attacker, iat=int(time.time()) - 7200, nbf=int(time.time()) - 7200,
                           exp=int(time.time()) - 3600),
        "other-customer": _signed(relay, sub=attacker, rid=victim_rid),
        "alg-none": "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0." + __import__("base64").urlsafe_b64encode(
            f'{{"iss":"tunnel-relay","aud":"tunnel-agent","sub":"{victim}","exp":9999999999}}'.encode()).decode().rstrip("=") + ".",
    }[kind]
    bad = agents.start(f"wss://127.0.0.1:{relay.port}", token, "db", service.port, ca_file=relay.ca_file)
    wait_until(lambda: not bad.alive(), 30, "the agent with a bad token to exit")
    assert bad.proc.returncode == 3
    log = bad.log()
    assert "relay refused this agent" in log
    if len(token) > 20:
        assert token not in log
    after = relay.resources()
    assert [(r["id"], r["name"], r["customer_id"]) for r in after] == [(r["id"], r["name"], r["customer_id"]) for r in before]
    assert relay.resource(victim, "db")["agents"] == 1


def test_agent_keeps_retrying_while_relay_is_down(tmp_path, agents, service_factory):
    relay = Relay(tmp_path)
    relay.start()
    customer = relay.create_customer("acme")
    token = relay.jwt("--customer-id", customer)
    relay.stop()
    service = service_factory("echo")
    agent = agents.start(f"wss://127.0.0.1:{relay.port}", token, "db", service.port, ca_file=relay.ca_file)
    wait_until(lambda: agent.log().count("reconnecting in") >= 2, 30, "two reconnect attempts")
    assert agent.alive()
    relay.start()
    try:
        relay.wait_available(customer, "db", timeout=60)
    finally:
        relay.stop()


def test_secrets_stay_out_of_logs_and_process_listings(relay, agents, service_factory):
    service = service_factory("echo")
    customer, token, agent = _setup(relay, agents, service, "wss")
    ps = open(f"/proc/{agent.pid}/cmdline", "rb").read()
    assert token.encode() not in ps
    admin_token = (relay.state_dir / "admin-token").read_text().strip()
    for f in ("admin-token", "signing-key.pem"):
        assert (relay.state_dir / f).stat().st_mode & 0o077 == 0
    for text in (agent.log(), relay.proc.log()):
        assert token not in text and admin_token not in text


def test_agent_never_skips_relay_certificate_verification(relay, agents, service_factory, transport):
    """Without RELAY_CA_FILE the relay's private CA is not trusted: no link, no resource."""
    service = service_factory("echo")
    customer = relay.create_customer("acme")
    agent = agents.start(f"{transport}://127.0.0.1:{relay.port}", relay.jwt("--customer-id", customer), "db",
                         service.port, ca_file=None)
    wait_until(lambda: agent.log().count("reconnecting in") >= 2, 60, "two failed attempts")
    assert "certificate" in agent.log().lower()
    assert agent.alive()  # a relay it cannot verify is a retryable condition, not a crash
    assert relay.resources() == []
