"""Per-customer quotas (docs/LIMITS.md, "Quotas") against a real relay: one customer over
its resources, live links or registrations per minute gets a clear ``error`` and a closed
link, alone; another customer's agents register and move bytes meanwhile; the relay logs each
condition once per interval. Resources no agent serves expire and free their port.

Found in a hostile review: a customer-wide JWT registered 9,984 resources (and bound as many
ports) in 30 s, and nothing limited a customer's links. About 15 s."""

from __future__ import annotations

import asyncio
import socket

import pytest

from tests.faults.faultkit import FAST, echo_once, register, setup_agent
from tests.helpers.processes import wait_until
from tunnel.wire.constants import ErrorCode

QUOTAS = {"TUNNEL_MAX_RESOURCES_PER_CUSTOMER": "4", "TUNNEL_MAX_LINKS_PER_CUSTOMER": "2",
          "TUNNEL_MAX_REGISTRATIONS_PER_MINUTE": "12"}


@pytest.fixture
def relay_env() -> dict:
    return {**FAST, **QUOTAS, "TUNNEL_RESOURCE_IDLE_EXPIRY": "3"}


def _refused(recorder, fragment: str) -> None:
    error = recorder.first("error")
    assert error is not None and error["code"] == "quota_exceeded", (recorder.messages, recorder.closed)
    assert fragment in error["message"], error
    assert recorder.closed[0] == ErrorCode.ENHANCE_YOUR_CALM and recorder.first("registered") is None


def test_one_customer_over_its_quotas_harms_nobody_else(relay, agents, service_factory):
    service = service_factory("echo")
    victim, victim_token, _, victim_addr = setup_agent(relay, agents, service, customer_name="victim")
    attacker = relay.create_customer("attacker")
    token = relay.jwt("--customer-id", attacker)

    async def attack():
        kept = []
        link, rec = await register(relay, token, ["n1", "n2", "n3", "n4"])
        assert rec.first("registered"), rec.messages
        kept.append(link)
        _, rec = await register(relay, token, ["n5"])
        _refused(rec, "over its quota of 4 resources (TUNNEL_MAX_RESOURCES_PER_CUSTOMER)")
        link, rec = await register(relay, token, ["n1"])
        assert rec.first("registered"), rec.messages
        kept.append(link)
        refusals = []
        for _ in range(12):  # further links: over the links quota, then over the rate
            _, rec = await register(relay, token, ["n2"])
            refusals.append(rec.first("error")["message"])
        return kept, refusals

    kept, refusals = asyncio.run(attack())
    print("\n".join(dict.fromkeys(refusals)))
    assert "over its quota of 2 live agent links (TUNNEL_MAX_LINKS_PER_CUSTOMER)" in refusals[0]
    assert "over its quota of 12 registrations per minute" in refusals[-1]
    assert all("registrations per minute" in r for r in refusals[refusals.index(refusals[-1]):])

    # The other customer: still moving bytes, and a second agent of it registers.
    assert echo_once(victim_addr, b"victim") == b"victim"
    agents.start(f"wss://127.0.0.1:{relay.port}", victim_token, "db", service.port, ca_file=relay.ca_file, **FAST)
    relay.wait_available(victim, "db", agents=2)
    assert sorted(r["name"] for r in relay.resources() if r["customer_id"] == attacker) == ["n1", "n2", "n3", "n4"]

    # A real agent over quota is told so and keeps retrying (not a fatal refusal).
    over = agents.start(f"wss://127.0.0.1:{relay.port}", token, "n9", service.port, ca_file=relay.ca_file, **FAST)
    wait_until(lambda: "quota_exceeded" in over.log() and "reconnecting in" in over.log(), 20, "the refusal")
    assert over.alive()

    log = relay.proc.log()
    assert log.count("over its quota of 2 live agent links") == 1, "logged once per interval"
    assert log.count("over its quota of 4 resources") == 1
    assert "Traceback" not in log


def test_resources_no_agent_serves_expire_and_free_their_port(relay, agents, service_factory):
    service = service_factory("echo")
    customer, token, agent, addr = setup_agent(relay, agents, service)  # "db", served all along

    async def leave_behind(names):
        link, rec = await register(relay, token, names)
        assert rec.first("registered"), rec.messages
        link.close()
        await link.wait_closed()

    asyncio.run(leave_behind(["pinned"]))
    pinned = relay.resource(customer, "pinned")["id"]
    relay.jwt("--customer-id", customer, "--resource-id", pinned)  # the operator's: never expires
    asyncio.run(leave_behind(["junk"]))
    junk = relay.resource(customer, "junk")
    port = int(junk["endpoint"].rsplit(":", 1)[1])

    wait_until(lambda: relay.resource(customer, "junk") is None, 30, "the unserved resource to expire")
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "its port is still bound"
    assert relay.resource(customer, "pinned") is not None
    assert relay.resource(customer, "db")["status"] == "AVAILABLE"
    assert echo_once(addr, b"served") == b"served"
    assert f"resource {junk['id']} (junk) of customer {customer} expired" in relay.proc.log()
