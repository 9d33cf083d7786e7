"""CONTROL messages of a registered agent (docs/PROTOCOL.md 5-7) sent by hand: what the relay
does with good ones, malformed ones (ignored, the link stays up), ones the token does not
allow (refused per name), and links of the same agent process (superseded)."""

from __future__ import annotations

import asyncio

from tests.faults.faultkit import register, until


def _agents(relay, customer, name):
    row = relay.resource(customer, name)
    return row["agents_detail"] if row else []


def test_add_remove_and_health_on_a_live_link(relay):
    customer = relay.create_customer("acme")
    token = relay.jwt("--customer-id", customer)

    async def main():
        link, rec = await register(relay, token, ["a"], instance="one")
        assert rec.first("registered")
        link.send_control({"type": "add_resources", "resources": [{"name": "b"}, {"name": "a"}]})
        await until(lambda: rec.first("resources_added"), 10, "resources_added")
        added = rec.first("resources_added")
        assert [r["name"] for r in added["resources"]] == ["b"] and added["refused"] == []
        # Malformed messages are ignored; the link stays up.
        for bad in ({"type": "add_resources", "resources": "b"},
                    {"type": "add_resources", "resources": [{"name": "no spaces"}]},
                    {"type": "remove_resources"},
                    {"type": "target_health", "resources": [{"name": "a", "reachable": "yes"},
                                                            {"name": "zzz", "reachable": False}, 7]},
                    {"type": "target_health", "resources": [{"name": "b", "reachable": False, "reason": "weird",
                                                             "message": "\x1b[31m" + "x" * 500}]}):
            link.send_control(bad)
        link.send_control({"type": "add_resources", "resources": [{"name": f"n{i}"} for i in range(63)]})
        await until(lambda: len([m for m in rec.messages if m.get("type") == "resources_added"]) == 2, 10,
                    "the second answer")
        too_many = [m for m in rec.messages if m.get("type") == "resources_added"][1]
        assert too_many["resources"] == [] and {r["code"] for r in too_many["refused"]} == {"bad_request"}
        link.send_control({"type": "remove_resources", "resources": [{"name": "a"}], "reason": "reload"})
        await until(lambda: rec.first("resources_removed"), 10, "resources_removed")
        assert [r["name"] for r in rec.first("resources_removed")["resources"]] == ["a"]
        return link, rec

    async def run():
        link, rec = await main()
        rows = await asyncio.to_thread(lambda: {r["name"]: r for r in relay.resources(extended=True)})
        assert rows["a"]["agents"] == 0 and rows["b"]["agents"] == 1
        [b_agent] = rows["b"]["agents_detail"]
        assert b_agent["target_status"] == "UNREACHABLE"
        assert b_agent["target_error"].startswith("\\x1b[31mxxx") and len(b_agent["target_error"]) <= 210
        assert not link.is_closing and rec.closed is None
        link.close()

    asyncio.run(run())


def test_a_resource_scoped_token_cannot_add_other_names(relay):
    customer = relay.create_customer("acme")

    async def run():
        wide = relay.jwt("--customer-id", customer)
        first, _ = await register(relay, wide, ["db"])
        first.close()
        rid = (await asyncio.to_thread(relay.resource, customer, "db"))["id"]
        scoped = await asyncio.to_thread(relay.jwt, "--customer-id", customer, "--resource-id", rid)
        link, rec = await register(relay, scoped, ["db"])
        link.send_control({"type": "add_resources", "resources": [{"name": "other"}]})
        await until(lambda: rec.first("resources_added"), 10, "the answer")
        [refused] = rec.first("resources_added")["refused"]
        assert refused["name"] == "other" and "another resource name" in refused["message"]
        assert (await asyncio.to_thread(relay.resource, customer, "other")) is None
        assert (await asyncio.to_thread(relay.resource, customer, "db"))["agents"] == 1
        link.close()

    asyncio.run(run())


def test_a_new_link_of_the_same_agent_supersedes_the_old_one(relay):
    acme = relay.create_customer("acme")
    other = relay.create_customer("other")

    async def run():
        token = relay.jwt("--customer-id", acme)
        old, _ = await register(relay, token, ["db"], instance="same")
        new, _ = await register(relay, token, ["db"], instance="same")
        agents = await asyncio.to_thread(_agents, relay, acme, "db")
        assert len(agents) == 1 and agents[0]["instance"] == "same"
        assert not old.is_closing  # its open streams may finish; it only gets no new ones
        # The same instance string under another customer supersedes nothing of acme's.
        stranger, _ = await register(relay, relay.jwt("--customer-id", other), ["db"], instance="same")
        assert len(await asyncio.to_thread(_agents, relay, acme, "db")) == 1
        assert len(await asyncio.to_thread(_agents, relay, other, "db")) == 1
        for link in (old, new, stranger):
            link.close()

    asyncio.run(run())
