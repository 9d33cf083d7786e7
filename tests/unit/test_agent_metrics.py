"""agent.metrics and METRICS_LISTEN without processes: configuration, dial failure reasons,
link state and readiness, bytes kept across links. tests/e2e/test_metrics.py runs the real
agent."""

from __future__ import annotations

import asyncio
import errno
import socket
from types import SimpleNamespace

import pytest

from agent import config as agent_config
from agent.health import TargetHealth
from agent.metrics import AgentMetrics, dial_reason

ENV = {"RELAY_URL": "wss://relay.example:8443", "REGISTRATION_JWT": "x.y.z", "NAME": "db",
       "APP_HOST": "10.0.0.5", "APP_PORT": "5432"}


def test_metrics_listen_is_optional_and_checked(tmp_path):
    assert agent_config.load(ENV).metrics_listen is None
    assert agent_config.load({**ENV, "METRICS_LISTEN": ":9465"}).metrics_listen == ("0.0.0.0", 9465)
    conf = tmp_path / "agent.toml"
    conf.write_text('metrics_listen = "127.0.0.1:9465"\n')
    assert agent_config.load(ENV, str(conf)).metrics_listen == ("127.0.0.1", 9465)
    with pytest.raises(agent_config.ConfigError, match="METRICS_LISTEN must be host:port"):
        agent_config.load({**ENV, "METRICS_LISTEN": "9465"})


@pytest.mark.parametrize("exc, reason", [
    (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), "refused"),
    (asyncio.TimeoutError(), "timeout"),
    (socket.gaierror(socket.EAI_NONAME, "no name"), "dns"),
    (OSError(errno.EHOSTUNREACH, "no route"), "unreachable"),
    (OSError(errno.EMFILE, "too many files"), "other"),
])
def test_dial_reasons(exc, reason):
    assert dial_reason(exc) == reason


class FakeLink:
    carrier = "quic"
    rtt = 0.02
    stream_count = 2

    def __init__(self) -> None:
        self.is_closing = False
        self.bytes_sent = 0
        self.bytes_received = 0
        self.closed = asyncio.Event()

    async def wait_closed(self) -> None:
        await self.closed.wait()


def _samples(metrics: AgentMetrics) -> dict:
    return {(f.name, labels): value for f in metrics.families() for _, labels, _, value in f.samples}


def test_state_readiness_and_bytes_across_links():
    async def main():
        target = agent_config.Target("db", "10.0.0.5", 5432)
        agent = SimpleNamespace(dialer=SimpleNamespace(host="::1", port=8443), link=None,
                                config=SimpleNamespace(targets=(target,), target=lambda name: target))
        metrics = AgentMetrics([agent]).slots[0]
        assert agent.metrics is metrics
        metrics = metrics.shared
        relay = "[::1]:8443"
        assert metrics.ready() == "not registered with the relay (connecting)"
        first = agent.link = FakeLink()
        agent.metrics.registered(first)
        first.bytes_sent, first.bytes_received = 100, 200
        assert metrics.ready() is None
        samples = _samples(metrics)
        assert samples["tunnel_agent_link_state", (relay, "registered")] == 1
        assert samples["tunnel_agent_link_transport", (relay, "quic")] == 1
        assert samples["tunnel_agent_link_rtt_seconds", (relay,)] == 0.02
        assert samples["tunnel_agent_streams_active", (relay,)] == 2

        first.is_closing = True  # the link is lost
        first.closed.set()
        agent.metrics.waiting()
        assert metrics.ready() == "not registered with the relay (waiting)"
        await asyncio.sleep(0)
        second = agent.link = FakeLink()
        agent.metrics.connecting()
        agent.metrics.registered(second)
        second.bytes_sent = 5
        samples = _samples(metrics)
        assert samples["tunnel_agent_reconnects_total", (relay,)] == 1
        assert samples["tunnel_agent_link_bytes_total", (relay, "sent")] == 105  # both links
        assert samples["tunnel_agent_link_bytes_total", (relay, "received")] == 200

        dial = asyncio.get_running_loop().create_future()
        dial.set_result(ConnectionRefusedError(errno.ECONNREFUSED, "refused"))
        agent.metrics.stream_dialing("db", dial)
        await asyncio.sleep(0)
        samples = _samples(metrics)
        assert samples["tunnel_agent_streams_opened_total", ("db",)] == 1
        assert samples["tunnel_agent_dial_failures_total", ("db", "10.0.0.5:5432", "refused")] == 1
        assert samples["tunnel_agent_dial_failures_total", ("db", "10.0.0.5:5432", "timeout")] == 0
        assert ("tunnel_agent_target_reachable", ("db",)) not in samples  # nothing known yet
        health = agent.health = TargetHealth(5.0, 30.0)
        health.result(target, ConnectionRefusedError(errno.ECONNREFUSED, "refused"))
        assert _samples(metrics)["tunnel_agent_target_reachable", ("db",)] == 0
        health.result(target, None)
        assert _samples(metrics)["tunnel_agent_target_reachable", ("db",)] == 1

    asyncio.run(main())


def test_every_slot_counted_and_labelled_by_its_relay():
    """RELAY_LINKS=2: streams and bytes on either slot's link count, each slot's series under
    the relay it is linked to, not the first RELAY_URL."""
    async def main():
        from agent.links import AgentLinks

        conf = agent_config.load({**ENV, "RELAY_URL": "wss://a.example:8443,wss://b.example:8443"})
        links = AgentLinks(conf, environ={})
        metrics = AgentMetrics(links.slots)
        assert [agent.metrics for agent in links.slots] == metrics.slots
        first, second = links.slots
        second.dialer = SimpleNamespace(host="b.example", port=8443)  # agent.links chose relay b
        for agent, sent in ((first, 10), (second, 20)):
            agent.link = FakeLink()
            agent.metrics.registered(agent.link)
            agent.link.bytes_sent = sent
            for _ in range(sent // 10):
                done = asyncio.get_running_loop().create_future()
                done.set_result(None)
                agent.metrics.stream_dialing("db", done)
        samples = _samples(metrics)
        assert samples["tunnel_agent_streams_opened_total", ("db",)] == 3
        for relay, sent in (("a.example:8443", 10), ("b.example:8443", 20)):
            assert samples["tunnel_agent_link_bytes_total", (relay, "sent")] == sent
            assert samples["tunnel_agent_link_state", (relay, "registered")] == 1
            assert samples["tunnel_agent_streams_active", (relay,)] == 2
        # Slot b's link is lost: its bytes stay with relay b; the slot redials b.
        second.link.is_closing = True
        second.link.closed.set()
        second.metrics.waiting()
        await asyncio.sleep(0)
        samples = _samples(metrics)
        assert samples["tunnel_agent_link_bytes_total", ("b.example:8443", "sent")] == 20
        assert samples["tunnel_agent_link_state", ("b.example:8443", "waiting")] == 1
        assert samples["tunnel_agent_reconnects_total", ("b.example:8443",)] == 1
        assert samples["tunnel_agent_reconnects_total", ("a.example:8443",)] == 0
        assert metrics.ready() is None  # slot a still serves

    asyncio.run(main())
