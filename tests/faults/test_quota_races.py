"""Quotas under concurrency (issue 20, item 2), in process with the relay's real state
(SQLite, and PostgreSQL where the quota is shared by a cluster), token authority, registry,
endpoints and cluster; only the agents' links are stand-ins that record what the relay sends.

Found in a hostile review: with ``MAX_RESOURCES_PER_CUSTOMER=4``, 20 concurrent registrations
were all accepted; 30 concurrent ``add_resources`` on one link passed the 64 per link; three
links of one customer took 199 of a 200-port range, after which another customer got
``internal: registration failed`` and the relay logged uncaught ``RuntimeError``s. A few s."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import pytest

from relay.state.cluster import Cluster
from relay.data.registry import Registry
from relay.control.names import MAX_RESOURCES_PER_AGENT
from relay.control.server import AgentLinkHandler, Relay
from relay.state.relay_state import RelayState
from relay.control.tokens import TokenAuthority
from tests.faults.test_registration_race import RecordingLink
from tests.helpers import async_wait_until
from tests.helpers.processes import free_port_range
from relay.settings import RelaySettings
from tunnel.core.limits import Limits


@contextlib.asynccontextmanager
async def _relay(tmp_path, database: str | None = None, port_range: tuple[int, int] | None = None,
                 service_host: str = "127.0.0.1", **settings):
    state = await RelayState.open(tmp_path, database)
    relay_settings = RelaySettings(**settings)
    registry = Registry(service_host, settings=relay_settings)
    cluster = Cluster(state, registry, "wss://127.0.0.1:8443")
    await cluster.start()
    relay = Relay(state, TokenAuthority(tmp_path), registry, Limits(), cluster=cluster, settings=relay_settings)
    if port_range is not None:
        relay.port_range = port_range
    try:
        yield relay
    finally:
        await asyncio.gather(*relay.tasks, return_exceptions=True)
        registry.close()
        await cluster.stop()
        await state.close()


def _auth(relay: Relay, token: str, names: list[str]) -> RecordingLink:
    link = RecordingLink()
    handler = AgentLinkHandler(relay, link)
    link.set_handler(handler)
    handler.control_received({"type": "auth", "token": token, "agent": {"version": "0.1.0"},
                              "resources": [{"name": n} for n in names]})
    return link


async def _settled(relay: Relay, links: list[RecordingLink]) -> None:
    await async_wait_until(lambda: all(link.sent for link in links), 30, "every registration answered")
    await asyncio.gather(*relay.tasks, return_exceptions=True)


def _codes(links: list[RecordingLink]) -> list[str]:
    return [link.sent[0].get("code", link.sent[0]["type"]) for link in links]


def _no_uncaught(caplog) -> None:
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not bad, caplog.text
    assert "never retrieved" not in caplog.text and "Traceback" not in caplog.text


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request):
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("postgres_url")


def test_concurrent_registrations_hold_the_resource_quota(tmp_path, database, caplog):
    caplog.set_level(logging.INFO)

    async def run():
        async with _relay(tmp_path, database, max_resources_per_customer=4) as relay:
            customer = (await relay.state.create_customer("acme"))["id"]
            token = relay.authority.issue(customer)
            links = [_auth(relay, token, [f"r{i}"]) for i in range(20)]
            await _settled(relay, links)
            return _codes(links), await relay.state.list_resources(customer), links

    codes, resources, links = asyncio.run(run())
    assert len(resources) == 4, resources
    assert sorted(codes) == ["quota_exceeded"] * 16 + ["registered"] * 4, codes
    refusal = next(link.sent[0] for link in links if link.sent[0]["type"] == "error")
    assert "over its quota of 4 resources (TUNNEL_MAX_RESOURCES_PER_CUSTOMER)" in refusal["message"]


def test_concurrent_links_on_two_relays_hold_the_customers_link_quota(tmp_path, postgres_url, caplog):
    """Links per customer are counted across the relays of a cluster, in the database."""
    caplog.set_level(logging.INFO)

    async def run():
        async with _relay(tmp_path, postgres_url, max_links_per_customer=4) as one, \
                _relay(tmp_path, postgres_url, service_host="127.0.0.2", max_links_per_customer=4) as two:
            customer = (await one.state.create_customer("acme"))["id"]
            token = one.authority.issue(customer)
            first = _auth(one, token, ["db"])  # creates the resource
            await _settled(one, [first])
            links = [_auth(relay, token, ["db"]) for _ in range(10) for relay in (one, two)]
            await async_wait_until(lambda: all(link.sent for link in links), 30, "every registration answered")
            await asyncio.gather(*one.tasks, *two.tasks, return_exceptions=True)
            return [first, *links], await one.state.list_links()

    links, rows = asyncio.run(run())
    codes = _codes(links)
    assert sorted(codes) == ["quota_exceeded"] * 17 + ["registered"] * 4, codes
    assert len(rows) == 4, rows


def test_concurrent_add_resources_stay_within_the_per_link_limit(tmp_path, caplog):
    caplog.set_level(logging.INFO)

    async def run():
        async with _relay(tmp_path) as relay:
            customer = (await relay.state.create_customer("acme"))["id"]
            token = relay.authority.issue(customer)
            link = _auth(relay, token, ["first"])
            await _settled(relay, [link])
            assert link.sent[0]["type"] == "registered", link.sent
            for i in range(30):
                link.handler.control_received({"type": "add_resources",
                                               "resources": [{"name": f"m{i}-{j}"} for j in range(3)]})
            await async_wait_until(
                lambda: sum(m["type"] == "resources_added" for m in link.sent) == 30, 30, "30 answers")
            await asyncio.gather(*relay.tasks, return_exceptions=True)
            agent = link.handler.agent
            answers = [m for m in link.sent if m["type"] == "resources_added"]
            return answers, len(agent.resources), agent.adding

    answers, served, adding = asyncio.run(run())
    added = sum(len(a["resources"]) for a in answers)
    refused = [r for a in answers for r in a["refused"]]
    assert served == MAX_RESOURCES_PER_AGENT and added == MAX_RESOURCES_PER_AGENT - 1, (served, added)
    assert len(refused) == 90 - added and {r["code"] for r in refused} == {"bad_request"}
    assert adding == 0
    _no_uncaught(caplog)


def test_one_customer_takes_at_most_its_share_of_the_port_range(tmp_path, caplog):
    caplog.set_level(logging.INFO)

    async def run():
        async with _relay(tmp_path, port_range=free_port_range(8), customer_port_share=0.5) as relay:
            greedy = (await relay.state.create_customer("greedy"))["id"]
            other = (await relay.state.create_customer("other"))["id"]
            greedy_token, other_token = relay.authority.issue(greedy), relay.authority.issue(other)
            links = [_auth(relay, greedy_token, [f"g{i}"]) for i in range(8)]
            await _settled(relay, links)
            theirs = _auth(relay, other_token, ["db"])
            await _settled(relay, [theirs])
            return _codes(links), links, theirs

    codes, links, theirs = asyncio.run(run())
    assert sorted(codes) == ["quota_exceeded"] * 4 + ["registered"] * 4, codes
    refusal = next(link.sent[0] for link in links if link.sent[0]["type"] == "error")
    assert "share of 4 endpoint ports" in refusal["message"] and "TUNNEL_CUSTOMER_PORT_SHARE" in refusal["message"]
    assert theirs.sent[0]["type"] == "registered", theirs.sent
    _no_uncaught(caplog)


def test_running_out_of_ports_is_relay_full_for_the_one_asking(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    low, high = free_port_range(4)
    held = []
    try:
        async def run():
            async with _relay(tmp_path, port_range=(low, high)) as relay:
                first = (await relay.state.create_customer("first"))["id"]
                second = (await relay.state.create_customer("second"))["id"]
                first_token, second_token = relay.authority.issue(first), relay.authority.issue(second)
                early = _auth(relay, second_token, ["db"])
                await _settled(relay, [early])
                for port in range(low, high + 1):  # the rest of the range, taken by another program
                    sock = socket.socket()
                    try:
                        sock.bind(("127.0.0.1", port))
                    except OSError:  # the endpoint of db
                        sock.close()
                        continue
                    sock.listen()
                    held.append(sock)
                over = [_auth(relay, first_token, [f"a{i}"]) for i in range(5)]
                over.append(_auth(relay, first_token, ["a0", "a1"]))
                await _settled(relay, over)
                # Another customer's agent of an existing resource still registers.
                again = _auth(relay, second_token, ["db"])
                await _settled(relay, [again])
                link = _auth(relay, second_token, ["db"])
                await _settled(relay, [link])
                link.handler.control_received({"type": "add_resources", "resources": [{"name": "new"}]})
                answer = await async_wait_until(
                    lambda: next((m for m in link.sent if m["type"] == "resources_added"), None), 30,
                    "the answer to add_resources")
                return early, over, again, answer

        early, over, again, added = asyncio.run(run())
    finally:
        for sock in held:
            sock.close()
    assert early.sent[0]["type"] == "registered"
    assert {link.sent[0]["code"] for link in over} == {"relay_full"}, [link.sent for link in over]
    assert "no free endpoint port in its --port-range" in over[0].sent[0]["message"]
    assert again.sent[0]["type"] == "registered", again.sent
    assert added["refused"][0]["code"] == "relay_full", added
    _no_uncaught(caplog)


def test_target_health_floods_make_a_bounded_number_of_log_lines(tmp_path, caplog):
    """Issue 20, item 6: 420 ``target_health`` messages (26,880 entries, 64 distinct targets,
    flipping between down and up) from one customer made 27,020 relay log lines in 3 s."""
    caplog.set_level(logging.INFO)

    async def run():
        async with _relay(tmp_path, max_target_log_lines_per_minute=30) as relay:
            flooder = (await relay.state.create_customer("flooder"))["id"]
            victim = (await relay.state.create_customer("victim"))["id"]
            names = [f"t{i}" for i in range(MAX_RESOURCES_PER_AGENT)]
            flood = _auth(relay, relay.authority.issue(flooder), names)
            quiet = _auth(relay, relay.authority.issue(victim), ["db"])
            await _settled(relay, [flood, quiet])
            caplog.clear()
            for i in range(420):
                flood.handler.control_received({"type": "target_health", "resources": [
                    {"name": n, "reachable": bool(i % 2), "reason": "refused", "message": f"no {i}"}
                    for n in names]})
            quiet.handler.control_received({"type": "target_health", "resources": [
                {"name": "db", "reachable": False, "reason": "refused", "message": "connection refused"}]})
            return flooder, flood.handler.agent.agent_id, quiet.handler.agent.agent_id

    flooder, flooding, victim = asyncio.run(run())
    lines = [r.getMessage() for r in caplog.records]
    theirs = [line for line in lines if flooding in line or flooder in line]
    print(len(theirs), theirs[-3:])
    assert len(theirs) <= 40, len(theirs)
    assert any(victim in line and "cannot reach the private service" in line for line in lines), lines[-5:]


def test_an_endpoint_that_cannot_bind_is_refused_as_unavailable_and_logged_once(tmp_path, caplog):
    """Issue 20, item 8: agents of a resource whose port something else holds on this relay
    get ``unavailable`` (they retry), the relay logs it once and lists it, and goes on."""
    caplog.set_level(logging.INFO)
    low, high = free_port_range(1)
    held = socket.socket()
    held.bind(("127.0.0.1", low))
    held.listen()

    async def run():
        async with _relay(tmp_path) as relay:
            customer = (await relay.state.create_customer("acme"))["id"]
            await relay.state.get_or_create_resource(customer, "db", lambda taken: low)
            token = relay.authority.issue(customer)
            links = [_auth(relay, token, ["db"]) for _ in range(3)]
            await _settled(relay, links)
            return links, dict(relay.registry.bind_errors)

    try:
        links, errors = asyncio.run(run())
    finally:
        held.close()
    assert {link.sent[0]["code"] for link in links} == {"unavailable"}, [link.sent for link in links]
    assert f"cannot bind 127.0.0.1:{low}" in links[0].sent[0]["message"]
    assert len(errors) == 1 and f"127.0.0.1:{low}" in next(iter(errors.values()))
    assert caplog.text.count("endpoint not served on this relay") == 1
