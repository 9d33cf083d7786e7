"""``auto://``: QUIC first; WSS within seconds when UDP to the relay is blocked; back to QUIC on
the re-probe interval once it works again, without dropping streams (new streams on QUIC, open
ones finish on WSS); a QUIC path that goes silent is given up within seconds.

The relay runs in a network namespace the test makes (tests/helpers/netns.py), joined to the
host by a veth pair; UDP is blocked and unblocked by iptables rules inside that namespace (the
relay's packets in and out), so the path goes silent both ways, as behind a firewall that
drops UDP. The
agent, the workers and the admin commands run as users run them.
"""

from __future__ import annotations

import socket
import time

import pytest

from tests.helpers import netns
from tests.helpers.processes import Relay, connect, echoed, recv_all, wait_until
from tests.helpers.steady import SteadyConnections


def _transports(relay, customer: str) -> list[str]:
    row = relay.resource(customer, "db")
    return sorted(a["transport"] for a in row["agents_detail"]) if row else []


def _echo_once(addr, data: bytes) -> bool:
    with connect(addr) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        return recv_all(s) == data


def test_auto_prefers_quic(relay, agents, service_factory):
    service = service_factory("echo")
    customer = relay.create_customer("acme")
    agents.start(f"auto://127.0.0.1:{relay.port}", relay.jwt("--customer-id", customer), "db", service.port,
                 ca_file=relay.ca_file)
    relay.wait_available(customer, "db")
    assert _transports(relay, customer) == ["quic"]
    assert _echo_once(relay.endpoint(customer, "db"), b"over quic")


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
def test_udp_blocked_then_unblocked_then_silent(ns_relay, agents, service_factory):
    relay, ns = ns_relay, ns_relay.ns
    blocks = [["INPUT", "-p", "udp", "--dport", str(relay.port), "-j", "DROP"],
              ["OUTPUT", "-p", "udp", "--sport", str(relay.port), "-j", "DROP"]]

    def udp(action: str) -> None:
        for rule in blocks:
            ns.iptables(action, *rule)

    service = service_factory("echo")
    customer = relay.create_customer("acme")
    token = relay.jwt("--customer-id", customer)

    # 1. UDP blocked from the start: on WSS within the probe timeout.
    udp("-I")
    started = time.monotonic()
    agent = agents.start(f"auto://{relay.host}:{relay.port}", token, "db", service.port, ca_file=relay.ca_file,
                         TUNNEL_QUIC_PROBE_TIMEOUT="1.5", TUNNEL_QUIC_REPROBE_INTERVAL="3")
    relay.wait_available(customer, "db", timeout=20)
    assert _transports(relay, customer) == ["wss"]
    print(f"UDP blocked: serving over WSS {time.monotonic() - started:.1f} s after the start")
    addr = relay.endpoint(customer, "db")
    old = connect(addr)  # a stream on WSS that stays open across the move
    assert echoed(old, b"on wss before the move")
    # The re-probes fail while UDP stays blocked, and say so at DEBUG.
    wait_until(lambda: agent.log().count("trying QUIC to") >= 2 and "QUIC still unreachable" in agent.log(), 20,
               "a failed QUIC re-probe")
    assert "dialling WSS; QUIC again every 3 s" in agent.log()
    assert _transports(relay, customer) == ["wss"]

    # 2. Unblocked: back on QUIC at the next re-probe; the open stream finishes on WSS.
    udp("-D")
    lifted = time.monotonic()
    wait_until(lambda: _transports(relay, customer) == ["quic"], 15, "the agent to move back to QUIC")
    moved = time.monotonic() - lifted
    print(f"UDP unblocked: new streams on QUIC {moved:.1f} s later (re-probe interval 3 s)")
    assert "QUIC is reachable again: moved to QUIC; the WebSocket link finishes its 1 open stream(s)" in agent.log()
    assert _echo_once(addr, b"a new stream, on quic")
    assert echoed(old, b"the old stream still flows on wss")
    old.close()

    # 3. The QUIC path goes silent: given up within seconds (TUNNEL_AUTO_QUIC_KEEPALIVE_TIMEOUT,
    #    4 s), straight to WSS; workers' new connections wait for it rather than fail.
    with SteadyConnections(addr, workers=2) as steady:
        wait_until(lambda: steady.count_ok() >= 5, 20, "traffic on QUIC")
        udp("-I")
        silenced = time.monotonic()
        wait_until(lambda: _transports(relay, customer) == ["wss"], 20, "the agent to give up the silent path")
        given_up = time.monotonic() - silenced
        wait_until(lambda: steady.count_ok(since=silenced + given_up) >= 5, 20, "traffic on WSS")
    print(f"QUIC path silent: serving over WSS again {given_up:.1f} s later")
    assert given_up < 8.0, f"the silent QUIC path took {given_up:.1f} s to give up"
    assert "the last QUIC link went silent: dialling WSS" in agent.log()
    lost = [a for a in steady.failures() if a.started >= silenced]
    print(f"{len(lost)} worker connection(s) opened on the silent path were lost")
    # Only connections opened on the path before it was given up can be lost.
    assert all(a.started < silenced + given_up for a in lost)
