"""``auto://``: QUIC first; WSS within seconds when UDP to the relay is blocked; back to QUIC
once it works again. The block is an iptables rule on loopback for the relay's UDP port only,
removed afterwards."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess

import pytest

from tests.helpers.processes import connect, recv_all, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("iptables"), reason="needs root and iptables")


class UdpBlock:
    def __init__(self, port: int) -> None:
        self.rule = ["INPUT", "-i", "lo", "-p", "udp", "--dport", str(port), "-j", "DROP"]
        self.active = False

    def __enter__(self) -> "UdpBlock":
        subprocess.run(["iptables", "-I", *self.rule], check=True, timeout=30)
        self.active = True
        return self

    def lift(self) -> None:
        if self.active:
            subprocess.run(["iptables", "-D", *self.rule], check=True, timeout=30)
            self.active = False

    def __exit__(self, *exc) -> None:
        self.lift()


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


def test_auto_falls_back_to_wss_when_udp_is_blocked_and_returns_to_quic(relay, agents, service_factory):
    service = service_factory("echo")
    customer = relay.create_customer("acme")
    token = relay.jwt("--customer-id", customer)
    with UdpBlock(relay.port) as block:
        agent = agents.start(f"auto://127.0.0.1:{relay.port}", token, "db", service.port, ca_file=relay.ca_file,
                             TUNNEL_QUIC_PROBE_TIMEOUT="1.5", TUNNEL_QUIC_REPROBE_INTERVAL="2")
        relay.wait_available(customer, "db", timeout=20)  # within a few seconds, over WSS
        assert _transports(relay, customer) == ["wss"]
        addr = relay.endpoint(customer, "db")
        assert _echo_once(addr, b"over wss")
        # While UDP stays blocked the re-probes fail and the agent stays on WSS.
        wait_until(lambda: "QUIC still unreachable" in agent.log(), 30, "a failed QUIC re-probe")
        assert _transports(relay, customer) == ["wss"]
        block.lift()
        wait_until(lambda: _transports(relay, customer) == ["quic"], 40, "the agent to move back to QUIC")
    assert _echo_once(addr, b"back on quic")
    assert "moved to QUIC" in agent.log()
