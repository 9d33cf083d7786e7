"""Revoking an agent instance in a cluster of three relays on one PostgreSQL: an agent process
linked to two relays (by registration token), revoked on the third, loses both links within
seconds (the revoking relay publishes a hint; the others re-read the revoked instances and
drop its links), and every relay refuses it when it links again."""

from __future__ import annotations

import time

import pytest

from tests.helpers import wait_until
from tests.helpers.cluster import AGENT_ENV, admin, aliases_work, cluster, two_holders  # noqa: F401 - a fixture

pytestmark = pytest.mark.skipif(not aliases_work(), reason="127.0.0.2/.3 are not loopback addresses here")


def test_a_revoked_instance_is_dropped_by_every_relay(cluster, agents, service_factory):
    c = cluster()
    relays = c.relays
    customer = relays[0].create_customer("acme")
    token = relays[0].jwt("--customer-id", customer)
    service = service_factory("echo")
    agent = agents.start(relays[0].url, token, "db", service.port, ca_file=c.ca_file, RELAY_LINKS="2",
                         **AGENT_ENV)
    db = relays[0].wait_available(customer, "db")

    held, holders, third = two_holders(relays, db["id"])
    instance = held[0]["agent_instance"]
    assert {link["agent_instance"] for link in held} == {instance}

    def here(relay) -> int:
        """The agent's links this relay holds now (its registry, not the database)."""
        return next(r for r in admin(relay).list_resources() if r["id"] == db["id"])["agents_here"]

    assert [here(r) for r in holders] == [1, 1]
    began = time.monotonic()
    revoked = admin(third).revoke_agent(instance)
    wait_until(lambda: all(here(r) == 0 for r in holders), 20, "both links dropped", interval=0.02)
    delay = time.monotonic() - began
    print(f"revocation on the third relay: both links gone after {delay:.3f} s")
    assert revoked == {"customer_id": customer, "instance": instance, "certificates": 0, "revoked": True}

    # It links again at once (its token is valid) and every relay refuses that instance.
    wait_until(lambda: agent.log().count("revoked") >= 3, 30, "the agent refused again")
    assert all(here(r) == 0 for r in relays)
    listed = wait_until(lambda: [a for a in admin(third).list_agents(customer) if not a["linked"]], 20,
                        "the links' records removed")
    assert listed[0]["instance"] == instance and listed[0]["revoked"] and listed[0]["identity"] == "token"
    for relay in relays:
        assert "Traceback" not in relay.proc.log()
