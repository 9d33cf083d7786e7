"""``auto://``: WSS, the faster carrier (tunnel.bridge.dial); QUIC within seconds when TCP to
the relay is blocked; back to WSS on the re-probe interval once it works again, without dropping
streams (new streams on WSS, open ones finish on QUIC).

The relay runs in a network namespace the test makes (tests/helpers/netns.py), joined to the
host by a veth pair; TCP to the relay's port is blocked and unblocked by iptables rules inside
that namespace (the relay's packets in and out), so the path goes silent both ways, as behind a
firewall that drops TCP. The agent, the workers and the admin commands run as users run them.
"""

from __future__ import annotations

import socket
import time

import pytest

from tests.helpers import netns
from tests.helpers.processes import Relay, connect, echoed, recv_all, wait_until


def _transports(relay, customer: str) -> list[str]:
    row = relay.resource(customer, "db")
    return sorted(a["transport"] for a in row["agents_detail"]) if row else []


def _echo_once(addr, data: bytes) -> bool:
    with connect(addr) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        return recv_all(s) == data


def test_auto_rides_wss(relay, agents, service_factory):
    service = service_factory("echo")
    customer = relay.create_customer("acme")
    agent = agents.start(f"auto://127.0.0.1:{relay.port}", relay.jwt("--customer-id", customer), "db", service.port,
                         ca_file=relay.ca_file)
    relay.wait_available(customer, "db")
    assert _transports(relay, customer) == ["wss"]
    assert _echo_once(relay.endpoint(customer, "db"), b"over wss")
    assert "trying QUIC" not in agent.log()


@pytest.fixture
def ns_relay(tmp_path):
    """A relay in a network namespace of its own (its address: ``relay.host``)."""
    if not netns.available():
        pytest.skip("needs root, ip and iptables")
    with netns.Namespace() as ns:
        relay = Relay(tmp_path, host=ns.ns_ip, command_prefix=ns.exec_prefix)
        relay.start()
        relay.ns = ns
        try:
            yield relay
        finally:
            relay.stop()


@pytest.mark.netns
def test_tcp_blocked_then_unblocked(ns_relay, agents, service_factory):
    relay, ns = ns_relay, ns_relay.ns
    blocks = [["INPUT", "-p", "tcp", "--dport", str(relay.port), "-j", "DROP"],
              ["OUTPUT", "-p", "tcp", "--sport", str(relay.port), "-j", "DROP"]]

    def tcp(action: str) -> None:
        for rule in blocks:
            ns.iptables(action, *rule)

    service = service_factory("echo")
    customer = relay.create_customer("acme")
    token = relay.jwt("--customer-id", customer)

    # 1. TCP blocked from the start: on QUIC once the WSS attempt times out.
    tcp("-I")
    started = time.monotonic()
    agent = agents.start(f"auto://{relay.host}:{relay.port}", token, "db", service.port, ca_file=relay.ca_file,
                         TUNNEL_HANDSHAKE_TIMEOUT="2", TUNNEL_QUIC_REPROBE_INTERVAL="3")
    relay.wait_available(customer, "db", timeout=20)
    assert _transports(relay, customer) == ["quic"]
    print(f"TCP blocked: serving over QUIC {time.monotonic() - started:.1f} s after the start")
    addr = relay.endpoint(customer, "db")
    old = connect(addr)  # a stream on QUIC that stays open across the move
    assert echoed(old, b"on quic before the move")
    # The re-probes fail while TCP stays blocked, and say so at DEBUG.
    wait_until(lambda: "WSS still unreachable" in agent.log(), 20, "a failed WSS re-probe")
    assert "riding QUIC; WSS again every 3 s" in agent.log()
    assert _transports(relay, customer) == ["quic"]

    # 2. Unblocked: back on WSS at the next re-probe; the open stream finishes on QUIC.
    tcp("-D")
    lifted = time.monotonic()
    wait_until(lambda: _transports(relay, customer) == ["wss"], 15, "the agent to move back to WSS")
    print(f"TCP unblocked: new streams on WSS {time.monotonic() - lifted:.1f} s later (re-probe interval 3 s)")
    assert "WSS is reachable again: moved to WSS; the QUIC link finishes its 1 open stream(s)" in agent.log()
    assert _echo_once(addr, b"a new stream, on wss")
    assert echoed(old, b"the old stream still flows on quic")
    old.close()
