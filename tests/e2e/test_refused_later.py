"""A resource the relay refuses on a live link for a passing reason (over the customer's quota
of resources) is asked for again by the agent, with backoff, and registers once there is room:
on the same link when room is made, or after the relay restarted with more (issue 20, item 10:
it was refused for the agent's life). The agent's other resources are served throughout.
About 20 s."""

from __future__ import annotations

import signal

import pytest

from tests.e2e.test_reload import _start
from tests.helpers.processes import PY, Proc, _env, wait_until

#: Agents retry within 2 s at most, so that the test waits little.
FAST_RETRY = {"TUNNEL_RECONNECT_DELAY": "0.5", "TUNNEL_RECONNECT_MAX_DELAY": "2"}


@pytest.fixture
def relay_env() -> dict:
    return {"TUNNEL_MAX_RESOURCES_PER_CUSTOMER": "2"}


def test_a_resource_refused_for_a_passing_reason_registers_once_there_is_room(tmp_path, relay, service_factory):
    services = {k: service_factory("echo") for k in ("a", "b", "c")}
    customer = relay.create_customer("acme")
    spare = relay.cli("resources", "create", "--customer-id", customer, "spare").stdout.split()[0]
    config, write, _ = _start(tmp_path, relay, customer, services)
    write({"a": "a"})
    agent = Proc("agent", [PY, "-m", "agent", "--config", str(config)], _env(LOG_LEVEL="DEBUG", **FAST_RETRY),
                 tmp_path / "agent.log").start()
    try:
        relay.wait_available(customer, "a")
        write({"a": "a", "b": "b"})
        agent.signal(signal.SIGHUP)
        wait_until(lambda: "refused resource b for now" in agent.log(), 20, "the refusal of b")
        assert "quota_exceeded" in agent.log()

        # Room made on the relay: b registers on the same link.
        relay.cli("resources", "delete", spare)
        relay.wait_available(customer, "b")
        assert relay.resource(customer, "a")["status"] == "AVAILABLE"
        assert "reconnecting" not in agent.log()

        # Refused again (a and b fill the quota); the relay restarts with room; c registers
        # after the agent reconnects, without costing a and b their registration.
        write({"a": "a", "b": "b", "c": "c"})
        agent.signal(signal.SIGHUP)
        wait_until(lambda: "refused resource c for now" in agent.log(), 20, "the refusal of c")
        relay.stop()
        relay.start(TUNNEL_MAX_RESOURCES_PER_CUSTOMER="3")
        for name in ("a", "b", "c"):
            relay.wait_available(customer, name)
        assert agent.alive()
        assert "Traceback" not in agent.log() + relay.proc.log()
    finally:
        agent.stop()
