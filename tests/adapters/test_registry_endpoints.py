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



class _WorkerTransport(_Transport):
    """A worker's connection: what the relay wrote to it, and whether it was reset."""

    def __init__(self) -> None:
        super().__init__()
        self.written = []

    def get_write_buffer_size(self) -> int:
        return 0

    def write(self, data) -> None:
        self.written.append(bytes(data))


class _ForwardedStream:
    """A stream to the relay holding the agent: what it was sent, how it ended."""

    stream_id = 1
    paused = False

    def __init__(self, handler) -> None:
        self.handler = handler
        self.sent = []
        self.eof = False
        self.resets = []

    def write(self, data) -> None:
        self.sent.append(bytes(data))

    def write_eof(self) -> None:
        self.eof = True

    def reset(self, code) -> None:
        self.resets.append(code)

    def consume(self, n) -> None:
        pass


class _Forwarder:
    """relay.data.peering.Peering as a forwarding relay sees it: each open a new stream."""

    def __init__(self) -> None:
        self.streams = []

    async def open_forward(self, resource_id, handler, worker=b""):
        from tunnel.bridge.tcp import LinkBuffers

        self.streams.append(_ForwardedStream(handler))
        return self.streams[-1], LinkBuffers(1 << 20)


def _forwarding_endpoint(**settings):
    from relay.data.endpoints import Endpoint, EndpointBridge
    from relay.settings import DEFAULT_RELAY_SETTINGS

    registry = Registry("127.0.0.1", settings=DEFAULT_RELAY_SETTINGS.replace(**settings))
    registry.forwarder = _Forwarder()
    endpoint = registry.endpoints["res_a"] = Endpoint(registry, "res_a", "db", "cus_a", "127.0.0.1", 0)
    worker = _WorkerTransport()
    bridge = EndpointBridge(endpoint)
    bridge.connection_made(worker)  # no agent here: forwarded
    return registry.forwarder.streams, bridge, worker


def test_a_forwarded_open_the_holding_relay_refuses_goes_again_with_what_the_worker_sent(run, wait_until):
    """The relay holding the agent lost it between the look-up and the forwarded open and
    refuses the stream (REFUSED, nothing came back): the worker's connection is not reset; it
    is forwarded again, with every byte and the FIN the worker sent, and then bridged as usual."""
    from tunnel.wire.constants import ErrorCode

    async def go():
        streams, bridge, worker = _forwarding_endpoint()
        bridge.data_received(b"GET ")
        await wait_until(lambda: streams, 5, "the first forwarded open")
        bridge.data_received(b"/")
        bridge.eof_received()
        first = streams[0]
        assert first.sent == [b"GET ", b"/"] and first.eof
        first.handler.reset_received(ErrorCode.REFUSED)  # the holder has no agent any more
        first.handler.closed()
        assert not worker.closing
        await wait_until(lambda: len(streams) == 2, 5, "the connection forwarded again")
        second = streams[1]
        assert second.sent == [b"GET ", b"/"] and second.eof and not worker.closing
        second.handler.data_received(b"200")
        assert worker.written == [b"200"]
        # Once the holder answered, the open was taken: a later REFUSED resets as any reset.
        second.handler.reset_received(ErrorCode.REFUSED)
        assert worker.closing and bridge.done and len(streams) == 2

    run(go())


def test_a_forwarded_open_refused_until_the_hold_timeout_is_reset(run, wait_until):
    """Refused again and again (the holder's record still names an agent it lost), the
    connection is reset once the hold timeout counted from the first refusal has passed; one
    that sent more than the relay keeps for a retry is reset at the first refusal."""
    from relay.data.forward import EARLY_LIMIT
    from tunnel.wire.constants import ErrorCode

    async def go():
        streams, bridge, worker = _forwarding_endpoint(endpoint_hold_timeout=1.0)
        await wait_until(lambda: streams, 5, "the first forwarded open")
        refused = 0
        while not worker.closing:
            await wait_until(lambda: len(streams) > refused or worker.closing, 5, "another try")
            if len(streams) > refused:
                streams[refused].handler.reset_received(ErrorCode.REFUSED)
                refused += 1
        assert bridge.done and bridge.refused == "no_agent" and 2 <= refused <= 4

        streams, bridge, worker = _forwarding_endpoint()
        await wait_until(lambda: streams, 5, "the first forwarded open")
        bridge.data_received(bytes(EARLY_LIMIT + 1))
        streams[0].handler.reset_received(ErrorCode.REFUSED)
        assert worker.closing and bridge.done and bridge.reset_code == ErrorCode.REFUSED

    run(go())
