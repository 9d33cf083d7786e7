"""relay.registry: an endpoint is bound once however many ask at once (a registration and the
``resource_created`` event of the same resource race on every relay of a cluster); a connection
waiting for an agent is dropped cleanly when its worker goes first."""

from __future__ import annotations

import asyncio
import socket

from relay.registry import Registry


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
    from relay.registry import AgentSession, EndpointBridge
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
