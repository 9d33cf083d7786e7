"""Deregistering one resource (``--rotate``, ``delete``) ends only that resource on the
agent: a real agent serving three resources over one link loses them one at a time. The
streams of the resource that goes end; those of the others keep moving exact bytes on the
same link, with the same agent id; the agent logs each CONTROL ``deregistered``. Left with
nothing to serve it exits with its clear message and code 3. About 10 s."""

from __future__ import annotations

import socket

from tests.faults.faultkit import FAST, serves
from tests.helpers.processes import connect, wait_until


def _ended(s: socket.socket) -> bool:
    s.settimeout(0.05)
    try:
        return s.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def _echoes(s: socket.socket, payload: bytes) -> bool:
    s.settimeout(10)
    s.sendall(payload)
    got = b""
    while len(got) < len(payload):
        piece = s.recv(len(payload) - len(got))
        if not piece:
            return False
        got += piece
    return got == payload


def test_one_resource_goes_the_others_stay(relay, agents, service_factory, tmp_path):
    service = service_factory("echo")
    customer = relay.create_customer("acme")
    token = relay.jwt("--customer-id", customer)
    config = tmp_path / "agent.toml"
    config.write_text("".join(f'[[resources]]\nname = "{n}"\nhost = "127.0.0.1"\nport = {service.port}\n'
                              for n in ("b", "c")))
    agent = agents.start(f"wss://127.0.0.1:{relay.port}", token, "a", service.port, ca_file=relay.ca_file,
                         AGENT_CONFIG_FILE=str(config), **FAST)
    for name in "abc":
        relay.wait_available(customer, name)
    ids = {n: relay.resource(customer, n)["id"] for n in "abc"}
    agent_id = relay.resource(customer, "c")["agents_detail"][0]["agent_id"]
    conns = {n: connect(relay.endpoint(customer, n)) for n in "abc"}
    try:
        for n, s in conns.items():
            assert _echoes(s, f"before {n}".encode())

        # Rotate a: a's stream ends, b and c go on over the same link.
        relay.jwt("--customer-id", customer, "--resource-id", ids["a"], "--rotate")
        wait_until(lambda: _ended(conns["a"]), 10, "a's stream to end")
        wait_until(lambda: "relay deregistered resource a" in agent.log(), 10, "the agent to log it")
        assert _echoes(conns["b"], b"b after a") and _echoes(conns["c"], b"c after a")
        assert agent.alive()
        assert relay.resource(customer, "a")["status"] == "UNAVAILABLE"

        # Delete b: the same again.
        relay.cli("resources", "delete", ids["b"])
        wait_until(lambda: _ended(conns["b"]), 10, "b's stream to end")
        wait_until(lambda: "relay deregistered resource b" in agent.log(), 10, "the agent to log it")
        assert _echoes(conns["c"], b"c after b")
        assert serves(relay.endpoint(customer, "c"))  # new streams too
        detail = relay.resource(customer, "c")["agents_detail"]
        assert [d["agent_id"] for d in detail] == [agent_id], "the agent's link was replaced"
        assert agent.alive()

        # Delete c, its last: the agent exits 3 with a clear message.
        relay.cli("resources", "delete", ids["c"])
        wait_until(lambda: not agent.alive(), 15, "the agent to exit")
        assert agent.proc.returncode == 3
        assert "resource deleted" in agent.log() and "not retrying" in agent.log()
    finally:
        for s in conns.values():
            s.close()
    assert "Traceback" not in relay.proc.log()
