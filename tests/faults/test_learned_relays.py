"""A relay (or whoever can write the relays' database: the ``advertise_url`` column) names the
relays of its cluster to the agent (CONTROL ``relays``). The agent dials one, and sends it its
registration JWT, only within what its configuration allows: RELAY_URL's hosts and their
domain, or RELAY_ALLOW_HOSTS; a relay named outside that gets no connection at all, even with
a certificate the agent trusts."""

from __future__ import annotations

import asyncio

import pytest

from agent.config import ConfigError, load, relay_allowed
from tests.faults.hostile_relay import HostileRelay
from tests.helpers.cluster import aliases_work


async def _wait(condition, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(0.05)


def test_a_relay_named_by_the_cluster_outside_the_configuration_gets_no_token(tmp_path, agents):
    if not aliases_work():
        pytest.skip("127.0.0.2 and 127.0.0.3 are not loopback addresses here")

    async def main():
        # One CA for the three: the agent would trust the attacker's certificate.
        async with HostileRelay(tmp_path) as relay, HostileRelay(tmp_path, "127.0.0.2") as attacker, \
                HostileRelay(tmp_path, "127.0.0.3") as allowed:
            agent = agents.start(relay.url, "x.y.z", "db", 9, ca_file=relay.ca_file, RELAY_LINKS="2",
                                 RELAY_ALLOW_HOSTS="127.0.0.3")
            link = await relay.wait_agent()
            link.send_control({"type": "relays", "relays": [
                {"id": "rly_a", "url": relay.url, "draining": False},
                {"id": "rly_evil", "url": attacker.url, "draining": False}]})
            await _wait(lambda: "not dialling " + attacker.url in agent.log(), 20, "the agent to refuse it")
            # Then one it is allowed to dial: its second link goes there, never to the attacker.
            link.send_control({"type": "relays", "relays": [
                {"id": "rly_a", "url": relay.url, "draining": False},
                {"id": "rly_evil", "url": attacker.url, "draining": False},
                {"id": "rly_ok", "url": allowed.url, "draining": False}]})
            await _wait(lambda: allowed.auths, 20, "the agent to register on the allowed relay")
            assert attacker.auths == []
            assert agent.alive()
            assert agent.log().count("not dialling " + attacker.url) == 1

    asyncio.run(main())


def test_the_rule(tmp_path):
    configured = ("wss://relay.example.com:8443", "quic://10.0.0.5:8443")
    assert relay_allowed("wss://relay.example.com:9000", configured)
    assert relay_allowed("auto://relay-2.example.com:8443", configured)
    assert relay_allowed("wss://a.b.example.com:8443", configured)
    assert relay_allowed("wss://10.0.0.5:8443", configured)
    for url in ("wss://example.com.attacker.net:8443", "wss://attackerexample.com:8443", "wss://10.0.0.6:8443",
                "wss://com:8443", "wss://relay.example.org:8443"):
        assert not relay_allowed(url, configured), url
    # Two labels or fewer vouch for themselves only.
    assert not relay_allowed("wss://other.com:1", ("wss://example.com:1",))
    assert not relay_allowed("wss://relay2:1", ("wss://relay1:1",))
    allow = (".relays.example.net", "relay-9.example.org", "10.1.0.0/16")
    assert relay_allowed("wss://r1.relays.example.net:1", configured, allow)
    assert relay_allowed("wss://relays.example.net:1", configured, allow)
    assert relay_allowed("wss://relay-9.example.org:1", configured, allow)
    assert relay_allowed("wss://10.1.200.3:1", configured, allow)
    assert not relay_allowed("wss://xrelays.example.net:1", configured, allow)
    assert not relay_allowed("wss://10.2.0.1:1", configured, allow)

    env = {"RELAY_URL": "wss://127.0.0.1:8443", "REGISTRATION_JWT": "x.y.z", "NAME": "db", "APP_HOST": "h",
           "APP_PORT": "1"}
    config = load({**env, "RELAY_ALLOW_HOSTS": " *.Relays.Example.NET., 10.1.0.0/16 "})
    assert config.relay_allow_hosts == ("*.relays.example.net", "10.1.0.0/16")
    assert config.relay_allowed("wss://a.relays.example.net:1") and not config.relay_allowed("wss://b.example.net:1")
    for bad in ("10.1.0.0/33", "exa mple.com", "a..com", "*."):
        with pytest.raises(ConfigError, match="RELAY_ALLOW_HOSTS"):
            load({**env, "RELAY_ALLOW_HOSTS": bad})
