"""An unreachable private service is visible: the agent notices when its target refuses or does
not resolve (real dials, and a light periodic check while idle), tells the relay (CONTROL
``target_health``), and ``resources list`` shows it per agent and for the resource. Routing
prefers an agent whose service answers; with none, a worker's connection is reset at once and
the relay logs why, once per interval."""

from __future__ import annotations

import signal
import socket
import time

from tests.helpers.processes import free_port, wait_until
from tests.helpers.steady import SteadyConnections

#: Agents check an idle service every second here (default 30 s).
CHECK = {"TUNNEL_TARGET_CHECK_INTERVAL": "1"}


def _reset_promptly(addr) -> float:
    """Seconds until the relay closed or reset a fresh connection (it must, without data)."""
    t0 = time.monotonic()
    try:
        with socket.create_connection(addr, timeout=10) as s:
            s.sendall(b"hello")
            assert s.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        pass
    return time.monotonic() - t0


def test_unreachable_targets_are_shown_avoided_and_explained(relay, agents, service_factory):
    customer = relay.create_customer("acme")
    token = relay.jwt("--customer-id", customer)
    url = f"wss://127.0.0.1:{relay.port}"
    dead_port = free_port()  # nothing listens here yet
    broken = agents.start(url, token, "db", dead_port, ca_file=relay.ca_file, **CHECK)
    working_service = service_factory("echo")
    working = agents.start(url, token, "db", working_service.port, ca_file=relay.ca_file, **CHECK)
    agents.start(url, token, "dns", 5432, app_host="db.invalid", ca_file=relay.ca_file, **CHECK)

    def row(name):
        return relay.resource(customer, name)

    wait_until(lambda: row("db") and row("db")["agents"] == 2
               and sorted(a["target_status"] for a in row("db")["agents_detail"]) == ["REACHABLE", "UNREACHABLE"],
               30, "both agents to report on their service")
    db = row("db")
    assert db["target_status"] == "REACHABLE" and db["target_error"] is None
    failing = next(a for a in db["agents_detail"] if a["target_status"] == "UNREACHABLE")
    assert failing["target_error"] == "connection refused: nothing listens on the configured port"
    assert str(dead_port) not in str(db), "the private address must not reach the relay"

    # Every worker's connection goes to the agent whose service answers.
    addr = relay.endpoint(customer, "db")
    with SteadyConnections(addr) as steady:
        wait_until(lambda: steady.count_ok() >= 20, 30, "20 connections")
    assert not steady.failures(), steady.failures()[:3]

    # DNS failure: shown with its reason; workers reset at once.
    wait_until(lambda: row("dns") and row("dns")["target_status"] == "UNREACHABLE", 30, "the dns resource's report")
    assert row("dns")["target_error"] == "the configured host does not resolve at the agent"
    assert _reset_promptly(relay.endpoint(customer, "dns")) < 2.0

    # The working agent stops: its service-less colleague is all there is; prompt resets, one
    # log line for many resets.
    working.signal(signal.SIGTERM)
    assert working.proc.wait(15) == 0
    wait_until(lambda: row("db")["agents"] == 1, 10, "one agent left")
    assert row("db")["target_status"] == "UNREACHABLE"
    waits = [_reset_promptly(addr) for _ in range(5)]
    assert max(waits) < 2.0, waits
    log = relay.proc.log()
    assert log.count("(db): a worker's connection was reset: agent") == 1, "the reason, once per interval"
    assert "cannot reach the private service (connection refused: nothing listens on the configured port)" in log
    agent_log = broken.log()
    assert agent_log.count(f"resource db: nothing listens on 127.0.0.1:{dead_port} (connection refused) -> fix: "
                           "start the service, or fix APP_PORT (and APP_HOST)") == 1, "the agent says it once"

    # The service comes up: the idle check sees it within the interval; traffic flows.
    service_factory("echo", port=dead_port)
    wait_until(lambda: row("db")["target_status"] == "REACHABLE", 15, "the service to be seen again")
    assert f"resource db: 127.0.0.1:{dead_port} answers again" in broken.log()
    assert "reaches the private service again" in relay.proc.log()
    with SteadyConnections(addr, workers=1) as steady:
        wait_until(lambda: steady.count_ok() >= 3, 20, "connections to the recovered service")
    assert not steady.failures()
