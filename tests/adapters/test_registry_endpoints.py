"""relay.data.registry: an endpoint is bound once however many ask at once (a registration and the
``resource_created`` event of the same resource race on every relay of a cluster); a connection
waiting for an agent is dropped cleanly when its worker goes first."""

from __future__ import annotations

import asyncio
import socket

from relay.data.registry import Registry


def test_concurrent_binds_of_one_resource_share_one_endpoint(run, cleanup):
    async def go():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        registry = Registry("127.0.0.1")
        cleanup.append(registry.close)
        resource = {"id": "res_a", "name": "db", "customer_id": "cus_a", "port": port}
        first, second, third = await asyncio.gather(*(registry.ensure_endpoint(resource) for _ in range(3)))
        assert first is second is third is registry.endpoints["res_a"]
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # it listens

    run(go())


class _Transport:
    """Enough of an asyncio transport for a bridge that never gets a stream."""

    def __init__(self) -> None:
        self.closing = False

    def get_extra_info(self, name, default=None):
        return default

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def abort(self) -> None:
        self.closing = True

    close = abort


class _Link:
    carrier = "wss"
    is_closing = False
    peer_address = ("192.0.2.1", 1)

    def __init__(self) -> None:
        self.opened = []

    def open_stream(self, metadata, handler):
        self.opened.append(metadata)
        raise AssertionError("a stream was opened for a worker that had gone")


def test_a_worker_gone_while_it_waits_gets_no_stream(run, cleanup):
    """A connection waiting for an agent whose worker reset it before the agent came is not
    handed to that agent (it would hold a stream nobody reads, counted for ever)."""
    from relay.data.endpoints import AgentSession, EndpointBridge
    from tunnel.bridge.tcp import LinkBuffers

    async def go():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        registry = Registry("127.0.0.1")
        cleanup.append(registry.close)
        endpoint = await registry.ensure_endpoint({"id": "res_a", "name": "db", "customer_id": "cus_a",
                                                   "port": port})
        bridge = EndpointBridge(endpoint)
        bridge.connection_made(_Transport())  # no agent: it waits
        bridge.connection_lost(ConnectionResetError())  # the worker is gone
        link = _Link()
        agent = AgentSession("agt_a", link, "cus_a", 0, "1", "h", {"res_a": "db"}, buffers=LinkBuffers(1 << 20))
        registry.add_agent(agent)  # the agent comes
        for _ in range(5):
            await asyncio.sleep(0)
        assert link.opened == [] and agent.active_streams == 0 and not endpoint.bridges and not endpoint.waiting

    run(go())


class _PeerStream:
    def __init__(self, resource_id: str) -> None:
        self.metadata = resource_id.encode()
        self.resets = []

    def reset(self, code) -> None:
        self.resets.append(code)


class _AgentLink(_Link):
    def __init__(self) -> None:
        super().__init__()
        self.sent = []

    def open_stream(self, metadata, handler):
        self.opened.append(metadata)
        return object()

    def send_control(self, message) -> None:
        self.sent.append(message)


def test_a_stream_forwarded_while_the_agent_leaves_still_reaches_it(run):
    """Between an agent's ``remove_resources`` (a graceful stop) and the rewrite of its link's
    record, another relay may still forward a worker here: it goes to that agent (which still
    serves it), not to a reset; local workers' connections no longer do."""
    from relay.data.peering import Peering
    from relay.data.endpoints import AgentSession, Endpoint
    from tunnel.core.limits import DEFAULT_LIMITS
    from tunnel.wire.constants import ErrorCode

    async def go():
        registry = Registry("127.0.0.1")
        endpoint = registry.endpoints["res_a"] = Endpoint(registry, "res_a", "db", "cus_a", "127.0.0.1", 0)
        link = _AgentLink()
        agent = AgentSession("agt_a", link, "cus_a", 0, "1", "h", {"res_a": "db"})
        registry.add_agent(agent)
        peering = Peering(None, registry, DEFAULT_LIMITS, server_context=None, client_context=None)
        registry.remove_resource(agent, "res_a")  # what CONTROL remove_resources does first
        agent.leaving.add("res_a")
        assert endpoint.pick_agent() is None  # local workers: no longer routed to it
        stream = _PeerStream("res_a")
        assert peering.stream_from_peer(stream) is not None and link.opened == [b"db"] and not stream.resets
        agent.leaving.discard("res_a")  # the record is rewritten: the others stop forwarding
        late = _PeerStream("res_a")
        assert peering.stream_from_peer(late) is None and late.resets == [ErrorCode.REFUSED]

    run(go())


def test_remove_resources_keeps_the_agent_for_forwarded_streams_until_its_record_is_rewritten(run):
    from types import SimpleNamespace

    from relay.control.agent_control import AgentControl
    from relay.data.endpoints import AgentSession, Endpoint
    from relay.settings import DEFAULT_RELAY_SETTINGS

    class Cluster:
        def __init__(self) -> None:
            self.written = asyncio.Event()
            self.relinked = []

        async def relink(self, session) -> None:
            await self.written.wait()
            self.relinked.append(sorted(session.resources))

    async def go():
        registry = Registry("127.0.0.1")
        registry.endpoints["res_a"] = Endpoint(registry, "res_a", "db", "cus_a", "127.0.0.1", 0)
        link = _AgentLink()
        agent = AgentSession("agt_a", link, "cus_a", 0, "1", "h", {"res_a": "db"})
        registry.add_agent(agent)
        cluster = Cluster()
        relay = SimpleNamespace(registry=registry, cluster=cluster, settings=DEFAULT_RELAY_SETTINGS,
                                spawn=lambda coro: asyncio.get_running_loop().create_task(coro))
        AgentControl(relay).received(agent, {"type": "remove_resources", "resources": [{"name": "db"}],
                                             "reason": "stopping"})
        assert link.sent == [{"type": "resources_removed", "resources": [{"name": "db", "id": "res_a"}]}]
        assert registry.endpoints["res_a"].pick_agent() is None and registry.leaving_agent("res_a") is agent
        cluster.written.set()
        for _ in range(3):
            await asyncio.sleep(0)
        assert cluster.relinked == [[]] and registry.leaving_agent("res_a") is None

    run(go())

