"""agent.links: which relay each of an agent's slots dials (RELAY_URL, the relays a relay
names, other slots, draining relays), without the network."""

from __future__ import annotations

import asyncio

import pytest

from agent import config as agent_config
from agent.links import AgentLinks

# One cluster's relays, under one domain (agent.config.relay_allowed).
A, B, C = "wss://a.relays.example:8443", "wss://b.relays.example:8443", "wss://c.relays.example:8443"


def _links(relay_url: str, links: int = 2) -> AgentLinks:
    conf = agent_config.load({"RELAY_URL": relay_url, "RELAY_LINKS": str(links), "REGISTRATION_JWT": "x",
                              "NAME": "db", "APP_HOST": "127.0.0.1", "APP_PORT": "5432"})
    return AgentLinks(conf)


class FakeHandler:
    def __init__(self, link) -> None:
        self.link = link
        self.moving = asyncio.get_running_loop().create_future()


class FakeLink:
    is_closing = False

    def __init__(self) -> None:
        self.goaways = []

    def goaway(self, code, reason) -> None:
        self.goaways.append(reason)
        self.is_closing = True


def _relays(*entries) -> dict:
    return {"type": "relays", "relays": [{"id": rid, "url": url, "draining": draining}
                                         for rid, url, draining in entries]}


def test_relay_url_lists_relays_and_relay_links_is_bounded():
    conf = agent_config.load({"RELAY_URL": f"{A}, {B}", "REGISTRATION_JWT": "x", "NAME": "db",
                              "APP_HOST": "h", "APP_PORT": "1"})
    assert conf.relay_urls == (A, B) and conf.relay_url == A and conf.relay_links == 2
    for bad in ("0", "17", "two"):
        with pytest.raises(agent_config.ConfigError, match="RELAY_LINKS"):
            agent_config.load({"RELAY_URL": A, "RELAY_LINKS": bad, "REGISTRATION_JWT": "x", "NAME": "db",
                               "APP_HOST": "h", "APP_PORT": "1"})
    with pytest.raises(agent_config.ConfigError, match="RELAY_URL"):
        agent_config.load({"RELAY_URL": f"{A},http://b", "REGISTRATION_JWT": "x", "NAME": "db",
                           "APP_HOST": "h", "APP_PORT": "1"})


def test_slots_take_distinct_relays_and_avoid_draining_ones(run):
    async def go():
        links = _links(A, links=2)
        first, second = links.slots
        assert (await links.dialer(first)).url == A
        # The second slot waits: no other relay is known yet.
        waiting = asyncio.ensure_future(links.dialer(second))
        await asyncio.sleep(0)
        assert not waiting.done()
        first.relay_id = "rly_a"
        links.registered(first, FakeLink())
        links.control(first, FakeHandler(FakeLink()), _relays(("rly_a", A, False), ("rly_b", B, False),
                                                               ("rly_c", C, True)))
        assert (await asyncio.wait_for(waiting, 1)).url == B  # not A (held), not C (draining)
        second.relay_id = "rly_b"
        # The first slot's relay drains: it moves to the one relay free, and its old link gets
        # GOAWAY only once the new one is registered.
        old = FakeLink()
        handler = FakeHandler(old)
        links.control(first, handler, {"type": "draining", "relay_id": "rly_a"})
        assert handler.moving.done()
        links.control(first, handler, _relays(("rly_a", A, True), ("rly_b", B, False), ("rly_c", C, False)))
        assert (await links.dialer(first)).url == C
        assert not old.goaways
        first.relay_id = "rly_c"
        links.registered(first, FakeLink())
        assert old.goaways == ["moved to another relay"]

    run(go())


def test_a_lone_relay_that_drained_is_dialled_again(run):
    """One relay: it restarts, so it announces that it drains (CONTROL ``relays``) and then
    closes the link. The first slot dials it again (the new process behind the URL drains no
    more) instead of waiting for a relay the agent, linked nowhere, would never hear of; the
    second slot still waits for a relay of its own."""
    async def go():
        links = _links(A, links=2)
        first, second = links.slots
        assert (await links.dialer(first)).url == A
        first.relay_id = "rly_a"
        links.registered(first, FakeLink())
        links.control(first, FakeHandler(FakeLink()), _relays(("rly_a", A, True)))
        assert (await asyncio.wait_for(links.dialer(first), 1)).url == A
        waiting = asyncio.ensure_future(links.dialer(second))
        await asyncio.sleep(0)
        assert not waiting.done()
        waiting.cancel()

    run(go())


def test_the_first_slot_tries_each_configured_relay_in_turn(run):
    async def go():
        links = _links(f"{A},{B}", links=1)
        (slot,) = links.slots
        tried = [(await links.dialer(slot)).url for _ in range(3)]
        assert tried == [A, B, A]
        links.registered(slot, FakeLink())
        assert (await links.dialer(slot)).url == A  # a registration starts the turn again

    run(go())


def test_relays_a_relay_names_are_checked(run):
    async def go():
        links = _links(A)
        links.control(links.slots[0], FakeHandler(FakeLink()), {"type": "relays", "relays": [
            {"id": "rly_b", "url": "http://b.example"}, {"id": "rly_c", "url": C}, "junk", {"id": 5, "url": B},
            {"id": "rly_d", "url": "wss://relays.example.attacker.net:8443"}]})
        assert links.relays == {"rly_c": {"url": C, "draining": False}}

    run(go())


def test_one_process_view_health_reload_and_stop_reach_every_slot(tmp_path, run):
    """The slots share one health watcher, whose changes go to every slot's link; a reload
    reads the file once and applies it to every slot; a stop reaches every slot."""
    jwt = tmp_path / "jwt"
    jwt.write_text("a.b.c\n")
    config = tmp_path / "agent.toml"

    def write(resources):
        config.write_text(f'relay_url = "{A},{B}"\nrelay_links = 2\n' + "".join(
            f'[[resources]]\nname = "{n}"\nhost = "127.0.0.1"\nport = {p}\n' for n, p in resources.items()))

    async def go():
        write({"a": 1, "b": 2})
        env = {"REGISTRATION_JWT_FILE": str(jwt)}
        links = AgentLinks(agent_config.load(env, str(config)), environ=env)
        first, second = links.slots
        assert first.health is second.health is links.health
        told = []
        for agent in links.slots:
            agent.health_changed = lambda name, slot=agent.slot: told.append((slot, name))
        links.health.result(links.config.target("a"), ConnectionRefusedError(111, "refused"))
        assert told == [(0, "a"), (1, "a")]
        write({"a": 1, "c": 3})
        assert links.reload()
        assert [t.name for t in links.config.targets] == ["a", "c"]
        assert all([t.name for t in agent.config.targets] == ["a", "c"] for agent in links.slots)
        config.write_text("relay_url = \n")
        assert not links.reload()
        assert all([t.name for t in agent.config.targets] == ["a", "c"] for agent in links.slots)
        for agent in links.slots:
            agent._stopping = asyncio.Event()
        assert not links.stopping
        links.stop()
        assert links.stopping and all(agent.stopping for agent in links.slots)

    run(go())
