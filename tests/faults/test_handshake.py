"""Before authentication: one deadline covers TLS, upgrade and auth, and hundreds of idle
connections on the agent port do not lock real agents out."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time

import pytest

from tests.faults.faultkit import FAST, raise_nofile, serves, setup_agent, wait_until
from tests.helpers.processes import Relay
from tunnel.core.limits import Limits
from tunnel.wire.errors import LinkError

HANDSHAKE_TIMEOUT = 3.0
MARGIN = 3.0


@pytest.fixture
def strict_relay(tmp_path):
    r = Relay(tmp_path)
    r.start(TUNNEL_HANDSHAKE_TIMEOUT=str(HANDSHAKE_TIMEOUT), **FAST)
    yield r
    r.stop()


async def _authenticated_time(relay, token: str, name: str = "probe", transport: str = "wss") -> float:
    """Seconds from dialling to ``registered`` for a hand-driven agent."""
    from tunnel.carriers.quic import connect_quic
    from tunnel.carriers.wss import connect_wss

    t0 = time.monotonic()
    if transport == "quic":
        link = await connect_quic("127.0.0.1", relay.port, ca_file=relay.ca_file, server_name="127.0.0.1",
                                  limits=Limits(), timeout=10)
    else:
        ctx = ssl.create_default_context(cafile=relay.ca_file)
        link = await connect_wss(f"wss://127.0.0.1:{relay.port}", ssl_context=ctx, limits=Limits(), timeout=10)
    answer = asyncio.get_running_loop().create_future()

    from tunnel.carriers.base import LinkHandler

    class H(LinkHandler):
        def control_received(self, message):
            if not answer.done():
                answer.set_result(message)

        def link_closed(self, code, reason):
            if not answer.done():
                answer.set_exception(LinkError(reason))

    link.set_handler(H())
    link.send_control({"type": "auth", "token": token, "agent": {}, "resources": [{"name": name}]})
    message = await asyncio.wait_for(answer, 10)
    took = time.monotonic() - t0
    assert message["type"] == "registered", message
    link.close()
    return took


def test_upgraded_but_silent_client_is_cut_at_the_deadline(strict_relay):
    from tunnel.carriers.session_link import SessionLink
    from tunnel.carriers.wss import open_wss_pipe
    from tunnel.core.session_state import Role

    async def main():
        ctx = ssl.create_default_context(cafile=strict_relay.ca_file)
        t0 = time.monotonic()
        pipe = await open_wss_pipe(f"wss://127.0.0.1:{strict_relay.port}", ssl_context=ctx, limits=Limits(),
                                   timeout=10)
        link = SessionLink(pipe, Role.AGENT, Limits())
        await link.wait_ready()  # TLS, upgrade and HELLO done; we never send auth
        await asyncio.wait_for(link.wait_closed(), HANDSHAKE_TIMEOUT + MARGIN)
        return time.monotonic() - t0

    took = asyncio.run(main())
    print(f"silent authenticated-less link cut after {took:.2f}s")
    assert took >= HANDSHAKE_TIMEOUT - 0.5


def test_silent_quic_client_is_cut_at_the_deadline(strict_relay):
    from tunnel.carriers.quic import connect_quic

    async def main():
        t0 = time.monotonic()
        link = await connect_quic("127.0.0.1", strict_relay.port, ca_file=strict_relay.ca_file,
                                  server_name="127.0.0.1", limits=Limits(), timeout=10)
        await asyncio.wait_for(link.wait_closed(), HANDSHAKE_TIMEOUT + MARGIN)
        return time.monotonic() - t0

    took = asyncio.run(main())
    print(f"silent QUIC link cut after {took:.2f}s")


def test_tcp_client_sending_nothing_is_cut(strict_relay):
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", strict_relay.port)) as s:
        s.settimeout(HANDSHAKE_TIMEOUT + MARGIN)
        try:
            assert s.recv(1) == b""
        except ConnectionResetError:
            pass
    assert time.monotonic() - t0 <= HANDSHAKE_TIMEOUT + MARGIN


IDLE = 300


def test_real_agents_register_while_300_idle_connections_hold_the_port(strict_relay, agents, service_factory):
    raise_nofile()
    relay = strict_relay
    customer = relay.create_customer("acme")
    token = relay.jwt("--customer-id", customer)
    idle: list[socket.socket] = []
    refilled = 0
    try:
        for _ in range(IDLE):
            idle.append(socket.create_connection(("127.0.0.1", relay.port)))
        opened = time.monotonic()
        # Let them go stale (the relay may evict handshakes pending over a second).
        wait_until(lambda: time.monotonic() - opened > 1.2, 5, "idle connections to age")
        # Registered at all: within its own handshake deadline, which the idle ones outlive.
        took = asyncio.run(_authenticated_time(relay, token))
        print(f"hand-driven agent registered in {took:.2f}s with {IDLE} idle connections on the port")
        # Keep the port full of idle connections (reopening those the relay cut) while a
        # real agent process starts and registers.
        service = service_factory("echo")
        agent = agents.start(f"wss://127.0.0.1:{relay.port}", token, "db", service.port, ca_file=relay.ca_file,
                             **FAST)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for i, s in enumerate(idle):
                s.setblocking(False)
                try:
                    gone = s.recv(1) == b""
                except BlockingIOError:
                    gone = False
                except OSError:
                    gone = True
                if gone:
                    s.close()
                    idle[i] = socket.create_connection(("127.0.0.1", relay.port))
                    refilled += 1
            if "serving resource" in agent.log():
                break
            time.sleep(0.05)  # pacing of the refill loop, not a wait for state
        assert "serving resource" in agent.log(), agent.log()[-2000:]
        assert serves(relay.endpoint(customer, "db"))
        print(f"real agent registered; {refilled} idle connections were cut and reopened meanwhile")
        assert relay.proc.alive()
    finally:
        for s in idle:
            s.close()


def test_real_quic_agents_register_while_300_idle_quic_handshakes_hold_the_port(tmp_path, agents, service_factory):
    """QUIC twin of the test above: 300 clients that pass address validation, finish the QUIC
    handshake and then say nothing hold all 256 slots (and are refused beyond them) while
    agents register. The deadline is long enough that none of them expires meanwhile."""
    from tests.helpers.quic_flood import idle_quic_clients

    relay = Relay(tmp_path)
    relay.start(TUNNEL_HANDSHAKE_TIMEOUT="15")  # default keepalive: the QUIC idle timeout must not free slots either
    customer = relay.create_customer("acme")
    token = relay.jwt("--customer-id", customer)

    async def main():
        flood = await idle_quic_clients("127.0.0.1", relay.port, IDLE, answer=True)
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while sum(c.received > 0 for c in flood) < IDLE:  # every one answered (admitted or refused)
                assert loop.time() < deadline, "relay did not answer the idle clients"
                await asyncio.sleep(0.05)
            opened = loop.time()
            while loop.time() - opened < 1.2:  # let them go stale: younger ones are never evicted
                await asyncio.sleep(0.05)
            took = await _authenticated_time(relay, token, transport="quic")
            print(f"hand-driven QUIC agent registered in {took:.2f}s with {IDLE} idle QUIC handshakes")
            assert took < 2.0
            service = service_factory("echo")
            agent = agents.start(f"quic://127.0.0.1:{relay.port}", token, "db", service.port,
                                 ca_file=relay.ca_file, **FAST)
            deadline = loop.time() + 30
            while "serving resource" not in agent.log():
                assert loop.time() < deadline, agent.log()[-2000:]
                await asyncio.sleep(0.05)
        finally:
            for c in flood:
                c.close()

    try:
        asyncio.run(main())
        assert serves(relay.endpoint(customer, "db"))
        assert relay.proc.alive()
    finally:
        relay.stop()
