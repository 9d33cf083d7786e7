"""relay.data.metrics without processes: readiness, labels from fixed sets, counters per resource.
The e2e suite (tests/e2e/test_metrics.py) checks the values after real traffic."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from types import SimpleNamespace

from relay.data.metrics import RelayMetrics, ready, reset_reason
from relay.data.quotas import QuotaExceeded
from relay.data.endpoints import Endpoint, EndpointBridge
from relay.data.registry import Registry
from relay.state.relay_state import RelayState
from relay.state.store.settings import StoreSettings
from tests.helpers import async_wait_until
from tests.helpers.tcp_proxy import TcpProxy
from tunnel.ops.logs import Throttled
from tunnel.wire.constants import ErrorCode


def _relay(state, accepting=True):
    return SimpleNamespace(state=state, accepting=accepting, throttled=Throttled(logging.getLogger("test")))


class _BrokenState:
    def ping(self):
        raise sqlite3.OperationalError("disk I/O error at /secret/path")


class _AsyncState:
    def __init__(self, error=None):
        self.error = error

    async def ping(self):
        await asyncio.sleep(0)
        if self.error:
            raise self.error


UNREACHABLE = "state database unreachable (the relay's log says why)"


def test_ready_needs_listeners_and_an_answering_state(tmp_path):
    async def main():
        state = await RelayState.open_dir(tmp_path)
        assert await ready(_relay(state)) is None
        assert await ready(_relay(state, accepting=False)) == "not accepting agents"
        # The answer says what is wrong in plain words: neither the failure's text (it may hold
        # paths or addresses) nor an internal class name.
        assert await ready(_relay(_BrokenState())) == UNREACHABLE
        await state.close()
        assert await ready(_relay(state)) == UNREACHABLE

    asyncio.run(main())


def test_ready_follows_a_postgresql_state(tmp_path, postgres_server, postgres_url):
    """The relay's state on PostgreSQL, reached through a proxy the test cuts: not ready while
    the database is away, ready again once it is back."""
    proxy = TcpProxy((postgres_server.host, postgres_server.port))
    via_proxy = postgres_url.replace(f":{postgres_server.port}/", f":{proxy.port}/")
    settings = StoreSettings(db_connect_timeout=1.0, db_query_timeout=1.0, db_reconnect_max=0.3)

    async def main():
        state = await RelayState.open(tmp_path, via_proxy, settings)
        relay = _relay(state)
        try:
            assert await ready(relay) is None
            proxy.cut()
            answers = []

            async def not_ready():
                answers.append(await ready(relay))
                return answers[-1] is not None

            await async_wait_until(not_ready, 10, "the relay to be not ready")
            assert answers[-1] == UNREACHABLE
            proxy.restore()

            async def ready_again():
                return await ready(relay) is None

            await async_wait_until(ready_again, 20, "the relay to be ready again")
        finally:
            await state.close()

    try:
        asyncio.run(main())
    finally:
        proxy.close()


def test_ready_awaits_a_coroutine_ping():
    assert asyncio.run(ready(_relay(_AsyncState()))) is None
    assert asyncio.run(ready(_relay(_AsyncState(ConnectionError("refused"))))) == UNREACHABLE


def test_reasons_come_from_fixed_sets():
    assert reset_reason(ErrorCode.CONNECT_FAILED) == "connect_failed"
    assert reset_reason(0xDEAD) == "other"  # a peer may send any number
    metrics = RelayMetrics()
    metrics.auth_refused("unauthorized")
    metrics.auth_refused("anything a future version invents")
    quota = QuotaExceeded("over", limit="max_links_per_customer", customer_id="cus_a")
    metrics.auth_refused(quota.code, quota)
    assert metrics.auth_failures == {"unauthorized": 1, "other": 1, "quota_exceeded": 1}
    assert metrics.quota_hits == {("cus_a", "max_links_per_customer"): 1}


def test_counters_per_resource_and_families():
    registry = Registry("127.0.0.1")
    metrics = registry.metrics
    endpoint = registry.endpoints["res_a"] = Endpoint(registry, "res_a", "db", "cus_a", "127.0.0.1", 0)
    metrics.stream_opened(endpoint)
    metrics.stream_refused(endpoint, "no_agent")
    metrics.stream_done(endpoint, SimpleNamespace(bytes_from_tcp=10, bytes_to_tcp=20, reset_code=None))
    metrics.stream_done(endpoint, SimpleNamespace(bytes_from_tcp=1, bytes_to_tcp=2, reset_code=ErrorCode.TIMEOUT))
    metrics.stream_done(endpoint, SimpleNamespace(bytes_from_tcp=0, bytes_to_tcp=0, reset_code=ErrorCode.NO_ERROR))
    live = EndpointBridge(endpoint)
    live.bytes_from_tcp, live.bytes_to_tcp = 100, 200
    endpoint.bridges.add(live)  # a stream still open
    samples = {(f.name, labels): value for f in metrics.families(registry) for _, labels, _, value in f.samples}
    assert samples["tunnel_relay_streams_opened_total", ("cus_a", "res_a")] == 1
    assert samples["tunnel_relay_streams_active", ("cus_a", "res_a")] == 1
    assert samples["tunnel_relay_streams_refused_total", ("cus_a", "res_a", "no_agent")] == 1
    assert samples["tunnel_relay_streams_failed_total", ("cus_a", "res_a", "timeout")] == 1
    assert ("tunnel_relay_streams_failed_total", ("cus_a", "res_a", "no_error")) not in samples
    assert samples["tunnel_relay_stream_bytes_total", ("cus_a", "res_a", "to_resource")] == 111
    assert samples["tunnel_relay_stream_bytes_total", ("cus_a", "res_a", "from_resource")] == 222
    assert samples["tunnel_relay_agents_connected", ("cus_a", "quic")] == 0
    assert samples["tunnel_relay_resources_available", ("cus_a",)] == 0


def test_agents_that_cannot_reach_the_service_are_counted():
    from relay.data.endpoints import AgentSession

    registry = Registry("127.0.0.1")
    endpoint = registry.endpoints["res_a"] = Endpoint(registry, "res_a", "db", "cus_a", "127.0.0.1", 0)
    link = SimpleNamespace(is_closing=False, carrier="wss")
    agents = [AgentSession(f"agt_{i}", link, "cus_a", 0, "1", "h", {"res_a": "db"}) for i in range(3)]
    endpoint.agents.extend(agents)
    registry.target_health(agents[0], "res_a", {"reachable": False, "reason": "refused", "message": "refused",
                                                 "since": 1})
    registry.target_health(agents[1], "res_a", {"reachable": True, "since": 1})

    def unreachable():
        return {labels: value for f in registry.metrics.families(registry) for _, labels, _, value in f.samples
                if f.name == "tunnel_relay_resource_agents_target_unreachable"}

    assert unreachable() == {("cus_a", "res_a"): 1}
    assert endpoint.pick_agent() is not agents[0]  # routing prefers an agent whose service answers
    registry.target_health(agents[0], "res_a", {"reachable": True, "since": 2})
    assert unreachable() == {("cus_a", "res_a"): 0}



def test_info_series_carry_names_escaped():
    from tests.helpers.prometheus import prometheus_available, promtool_check

    registry = Registry("127.0.0.1")
    registry.endpoints["res_a"] = Endpoint(registry, "res_a", "orders-db", "cus_a", "127.0.0.1", 0)
    hostile = 'Ac"me\\ } x="1"\nfake_metric 1 ünï'
    registry.metrics.customer_names = {"cus_a": hostile, "cus_b": "plain"}
    text = registry.metrics.render(registry).decode()
    assert 'tunnel_relay_resource_info{resource="res_a",name="orders-db",customer="cus_a"} 1\n' in text
    assert ('tunnel_relay_customer_info{customer="cus_a",name="Ac\\"me\\\\ } x=\\"1\\"\\nfake_metric 1 ünï"} 1\n'
            in text)
    assert 'tunnel_relay_customer_info{customer="cus_b",name="plain"} 1\n' in text
    assert "\nfake_metric" not in text
    if prometheus_available():
        assert promtool_check(text.encode()) == ""
