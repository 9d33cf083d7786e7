"""No resets across short outages: while a resource has no agent the relay holds new worker
connections (``TUNNEL_ENDPOINT_HOLD_TIMEOUT``, default 5 s) and hands them to the first agent
that registers; the agent's first reconnect after a link loss comes within about a second.

Real relay and agent processes with the default settings, a steady stream of new worker
connections through the endpoint, and the fault in the middle of it.
"""

from __future__ import annotations

import selectors
import signal
import socket
import time

from tests.helpers.processes import wait_until
from tests.helpers.steady import SteadyConnections


def _start_agent(relay, agents, token, service, **env):
    return agents.start(f"wss://127.0.0.1:{relay.port}", token, "db", service.port, ca_file=relay.ca_file, **env)


def test_agent_restarted_within_two_seconds_fails_no_connection(relay, agents, service_factory):
    service = service_factory("echo")
    customer = relay.create_customer("acme")
    token = relay.jwt("--customer-id", customer)
    first = _start_agent(relay, agents, token, service)
    relay.wait_available(customer, "db")
    addr = relay.endpoint(customer, "db")
    with SteadyConnections(addr) as steady:
        wait_until(lambda: steady.count_ok() >= 10, 20, "traffic before the restart")
        first.signal(signal.SIGTERM)
        stopped = time.monotonic()
        assert first.proc.wait(15) == 0, first.log()[-2000:]
        second = _start_agent(relay, agents, token, service)
        restarted = time.monotonic()
        assert restarted - stopped < 2.0, f"the restart itself took {restarted - stopped:.1f} s"
        wait_until(lambda: "serving resource db" in second.log(), 20, "the new agent to register")
        registered = time.monotonic()
        wait_until(lambda: steady.count_ok(since=registered) >= 10, 20, "traffic after the restart")
    gap = [a for a in steady.snapshot() if stopped <= a.started <= registered]
    assert gap, "no connection was made while no agent served the resource"
    assert not steady.failures(), steady.failures()[:5]
    print(f"agent restart: {len(gap)} connections made in the {registered - stopped:.1f} s without an agent, "
          f"all served; {len(steady.snapshot())} in all")
    assert "waiting connection(s) go to it" in relay.proc.log()


def test_relay_killed_and_restarted_fails_no_connection_once_back(relay, agents, service_factory):
    service = service_factory("echo")
    customer = relay.create_customer("acme")
    agent = _start_agent(relay, agents, relay.jwt("--customer-id", customer), service)
    relay.wait_available(customer, "db")
    addr = relay.endpoint(customer, "db")
    with SteadyConnections(addr) as steady:
        wait_until(lambda: steady.count_ok() >= 10, 20, "traffic before the kill")
        relay.proc.kill()
        killed = time.monotonic()
        relay.start()  # returns once its admin API answers: endpoints and listeners are up
        back = time.monotonic()
        wait_until(lambda: relay.resource(customer, "db")["status"] == "AVAILABLE", 20, "the agent to return")
        returned = time.monotonic()
        wait_until(lambda: steady.count_ok(since=returned) >= 10, 20, "traffic after the restart")
    accepted = [a for a in steady.snapshot() if a.started >= killed and a.outcome != "refused"]
    lost = [a for a in accepted if a.outcome != "ok"]
    # Connections the dead relay could not accept were refused; every one it accepted after
    # its return (some while no agent was back yet) was served.
    assert not lost, [(round(a.started - killed, 2), a.outcome) for a in lost[:5]]
    assert not [a for a in steady.snapshot() if a.started >= back and a.outcome == "refused"]
    log = agent.log()
    first_wait = float(log.split("; reconnecting in ")[1].split(" s")[0])
    assert first_wait <= 1.0, f"the agent's first reconnect came after {first_wait} s"
    print(f"relay kill -9: back {back - killed:.1f} s after the kill, agent registered {returned - back:.1f} s later; "
          f"{len(accepted)} connections accepted since the kill, all served (first reconnect wait {first_wait} s)")


def test_without_an_agent_connections_wait_a_bounded_time_then_reset(relay, agents, service_factory, tmp_path):
    """The hold is bounded in time and count, and a resource whose agent is long gone resets
    at once (the relay logs why)."""
    relay.stop()
    relay.start(TUNNEL_ENDPOINT_HOLD_TIMEOUT="1", TUNNEL_ENDPOINT_HOLD_MAX="3", TUNNEL_ENDPOINT_HOLD_WINDOW="4")
    service = service_factory("echo")
    customer = relay.create_customer("acme")
    agent = _start_agent(relay, agents, relay.jwt("--customer-id", customer), service)
    relay.wait_available(customer, "db")
    addr = relay.endpoint(customer, "db")
    agent.signal(signal.SIGTERM)
    assert agent.proc.wait(15) == 0
    left = time.monotonic()
    t0 = time.monotonic()
    attempts = [_connect(addr) for _ in range(5)]
    conns = [s for s in attempts if s is not None]
    try:
        waits = sorted([0.0] * (5 - len(conns)) + _ended_after(conns, t0, 10))
        # Beyond TUNNEL_ENDPOINT_HOLD_MAX, reset at once; the three held, reset after ~1 s.
        assert waits[1] < 0.7 and waits[2] >= 0.8, waits
        assert waits[-1] < 5, waits
    finally:
        for s in conns:
            s.close()
    # Past TUNNEL_ENDPOINT_HOLD_WINDOW after the last agent left: reset at once.
    wait_until(lambda: time.monotonic() - left > 4.5, 10, "the hold window to pass", interval=0.2)
    t0 = time.monotonic()
    s = _connect(addr)
    if s is not None:
        assert _ended_after([s], t0, 10)[0] < 0.5
        s.close()
    log = relay.proc.log()
    assert "already wait for an agent (TUNNEL_ENDPOINT_HOLD_MAX)" in log
    # The agent stopped gracefully: the log says so, not "no agent came" as after a crash.
    assert "its agents stopped (a graceful stop) and none came back within 1 s" in log
    assert "no agent has served it for" in log


def _ended_after(conns: list[socket.socket], t0: float, timeout: float) -> list[float]:
    """Seconds from ``t0`` until each connection was closed or reset by the relay (no data)."""
    sel = selectors.DefaultSelector()
    for s in conns:
        sel.register(s, selectors.EVENT_READ)
    ended = []
    deadline = t0 + timeout
    while len(ended) < len(conns) and time.monotonic() < deadline:
        for key, _ in sel.select(0.05):
            try:
                data = key.fileobj.recv(1)
            except ConnectionResetError:
                data = b""
            assert data == b"", "a connection without an agent got data"
            ended.append(time.monotonic() - t0)
            sel.unregister(key.fileobj)
    sel.close()
    assert len(ended) == len(conns), "a connection was neither served nor reset"
    return ended


def _connect(addr) -> socket.socket | None:
    """A connection to ``addr``; None when the relay reset it before connect() returned."""
    try:
        return socket.create_connection(addr, timeout=10)
    except ConnectionResetError:
        return None
