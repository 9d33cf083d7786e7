"""The previous release against this tree, both ways (docs/PROTOCOL.md, "Versions and
compatibility"): its agent against this relay, and this agent against its relay, through the
essentials: registration, streams both ways with half-closes, a reconnection after the relay
is killed and started again, and a graceful stop of the agent.

The previous release is the newest ``release:`` commit in CHANGELOG.md, taken from git
history into a temporary directory and run pure-Python (tests.helpers.release)."""

from __future__ import annotations

import os
import signal
import socket
import threading

import pytest

from tests.helpers import wait_until
from tests.helpers.processes import PY, PrivateService, Proc, Relay, _env, connect, recv_all
from tests.helpers.release import extract_previous_release, old_prefix, previous_release


@pytest.fixture(scope="module")
def old_tree(tmp_path_factory):
    """The previous release's files, from git history."""
    version, _ = previous_release()
    return extract_previous_release(tmp_path_factory.mktemp(f"release-{version}"))


def start_agent(workdir, name: str, relay: Relay, token: str, port: int, prefix: list[str],
                url: str | None = None) -> Proc:
    env = _env(RELAY_URL=url or relay.url, REGISTRATION_JWT=token, NAME="db", APP_HOST="127.0.0.1", APP_PORT=port,
               RELAY_CA_FILE=relay.ca_file, LOG_LEVEL="DEBUG")
    return Proc(name, [*prefix, PY, "-m", "agent"], env, workdir / f"{name}.log").start()


def streams_both_ways(addr: tuple[str, int]) -> None:
    """Several streams at once, each carrying bytes both ways and a half-close each way: the
    worker sends, half-closes, and reads back exactly what it sent, then the service's end."""
    payloads = [os.urandom(size) for size in (1, 1000, 300_000, 2_000_000)]
    answers: dict[int, bytes | Exception] = {}

    def worker(i: int) -> None:
        try:
            with connect(addr) as s:
                s.sendall(payloads[i])
                s.shutdown(socket.SHUT_WR)
                answers[i] = recv_all(s)
        except OSError as exc:
            answers[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(payloads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, payload in enumerate(payloads):
        assert answers.get(i) == payload, f"stream {i} ({len(payload)} bytes): {str(answers.get(i))[:100]}"


def essentials(tmp_path, relay: Relay, agent_prefix: list[str]) -> None:
    service = PrivateService("drain-then-echo")
    agent = None
    try:
        customer = relay.create_customer("acme")
        token = relay.jwt("--customer-id", customer)
        agent = start_agent(tmp_path, "agent", relay, token, service.port, agent_prefix)
        relay.wait_available(customer, "db")
        addr = relay.endpoint(customer, "db")
        streams_both_ways(addr)
        # Reconnection: the relay dies and comes back on the same state and port.
        relay.proc.kill()
        relay.start()
        relay.wait_available(customer, "db")
        streams_both_ways(addr)
        assert agent.alive()
        # Graceful stop: the agent deregisters and exits 0.
        agent.signal(signal.SIGTERM)
        wait_until(lambda: not agent.alive(), 30, "the agent to stop")
        assert agent.proc.returncode == 0, agent.log()[-2000:]
        wait_until(lambda: relay.resource(customer, "db")["status"] == "UNAVAILABLE", 10, "the resource released")
        assert "Traceback" not in relay.proc.log() + agent.log()
    finally:
        if agent is not None:
            agent.stop()
        service.close()


def test_previous_release_agent_against_this_relay(tmp_path, old_tree):
    version, tree = old_tree
    relay = Relay(tmp_path).start()
    try:
        essentials(tmp_path, relay, old_prefix(tree))
        assert f"version {version}" in relay.proc.log()  # the old agent said which it is
    finally:
        relay.stop()


def test_this_agent_against_previous_release_relay(tmp_path, old_tree):
    _, tree = old_tree
    relay = Relay(tmp_path, command_prefix=old_prefix(tree)).start()
    try:
        essentials(tmp_path, relay, [])
    finally:
        relay.stop()


def test_quic_mappings_of_both_releases_keep_apart(tmp_path, old_tree):
    """The QUIC mapping changed (ALPN tunnel/2, CHANGELOG): the previous release's ``auto://``
    agent still links to this relay, over WSS; this ``quic://`` agent against the previous
    relay says why it cannot link instead of hanging."""
    _, tree = old_tree
    service = PrivateService("drain-then-echo")
    agents: list[Proc] = []
    relay = Relay(tmp_path).start()
    try:
        customer = relay.create_customer("acme")
        token = relay.jwt("--customer-id", customer)
        agents.append(start_agent(tmp_path, "old-auto", relay, token, service.port, old_prefix(tree),
                                  url=f"auto://{relay.host}:{relay.port}"))
        relay.wait_available(customer, "db")
        streams_both_ways(relay.endpoint(customer, "db"))
        assert ", wss from " in relay.proc.log() and ", quic from " not in relay.proc.log()
    finally:
        for agent in agents:
            agent.stop()
        relay.stop()
    old_relay = Relay(tmp_path / "old", command_prefix=old_prefix(tree))
    old_relay.workdir.mkdir()
    old_relay.start()
    try:
        customer = old_relay.create_customer("acme")
        token = old_relay.jwt("--customer-id", customer)
        agents.append(start_agent(tmp_path, "new-quic", old_relay, token, service.port, [],
                                  url=f"quic://{old_relay.host}:{old_relay.port}"))
        wait_until(lambda: "another QUIC mapping" in agents[-1].log(), 30, "the agent to say why")
        assert "Traceback" not in agents[-1].log()
    finally:
        for agent in agents:
            agent.stop()
        old_relay.stop()
        service.close()
