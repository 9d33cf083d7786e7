"""The relay's live registry: which agents serve which resource, and one TCP endpoint per
resource where integration workers connect.

Each connection to an endpoint becomes one stream on the link of one of the resource's
agents, chosen by fewest active streams; when an agent leaves, new connections go to the
others. With no agent the connection is refused with a reset.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from tunnel.bridge.tcp import TcpBridge, stream_handler
from tunnel.carriers.base import Link
from tunnel.wire.constants import ErrorCode
from tunnel.wire.errors import UsageError

log = logging.getLogger("relay.registry")


@dataclass(eq=False)
class AgentSession:
    """One authenticated agent link."""

    agent_id: str
    link: Link
    customer_id: str
    generation: int
    version: str
    hostname: str
    resources: dict[str, str]  # resource id -> name
    #: The agent process (its random ``instance`` at auth) and which of its links this is;
    #: ``epoch`` orders the link records of one agent slot across relays (relay.cluster).
    instance: str = ""
    slot: int = 0
    epoch: int = 0
    connected_since: float = field(default_factory=time.time)
    active_streams: int = 0

    def describe(self) -> dict:
        host, port = self.link.peer_address[:2]
        return {
            "agent_id": self.agent_id,
            "transport": self.link.carrier,
            "address": f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}",
            "version": self.version,
            "hostname": self.hostname,
            "connected_since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.connected_since)),
            "bytes_sent": self.link.bytes_sent,
            "bytes_received": self.link.bytes_received,
            "active_streams": self.active_streams,
            "agent_instance": self.instance,
            "epoch": self.epoch,
        }


class EndpointBridge(TcpBridge):
    """An integration worker's TCP connection to a resource endpoint."""

    __slots__ = ("_endpoint",)

    def __init__(self, endpoint: "Endpoint") -> None:
        super().__init__()
        self._endpoint = endpoint

    def connection_made(self, transport: asyncio.Transport) -> None:
        endpoint = self._endpoint
        agent = endpoint.pick_agent()
        if agent is None:
            self.transport = transport
            log.info("resource %s: no agent available, refusing a connection", endpoint.resource_id)
            self.fail(ErrorCode.REFUSED)
            return
        try:
            stream = agent.link.open_stream(endpoint.name.encode(), stream_handler(self))
        except UsageError:  # the link began closing since it was picked
            self.transport = transport
            self.fail(ErrorCode.REFUSED)
            return
        agent.active_streams += 1

        def done() -> None:
            agent.active_streams -= 1

        self.on_done = done
        self.attach_stream(stream)
        super().connection_made(transport)


class Endpoint:
    """A resource's listening socket and the agents serving it."""

    def __init__(self, resource_id: str, name: str, host: str, port: int) -> None:
        self.resource_id = resource_id
        self.name = name
        self.host = host
        self.port = port
        self.agents: list[AgentSession] = []
        self.server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: EndpointBridge(self), self.host, self.port,
                                               reuse_address=True, backlog=1024)

    def pick_agent(self) -> AgentSession | None:
        live = [a for a in self.agents if not a.link.is_closing]
        return min(live, key=lambda a: a.active_streams) if live else None

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None


class Registry:
    """Live agents and endpoints; also what the admin API reads (``relay.admin.Registry``)."""

    def __init__(self, service_host: str) -> None:
        self.service_host = service_host
        self.endpoints: dict[str, Endpoint] = {}
        self.agents: set[AgentSession] = set()

    async def ensure_endpoint(self, resource: dict) -> Endpoint:
        endpoint = self.endpoints.get(resource["id"])
        if endpoint is None:
            endpoint = Endpoint(resource["id"], resource["name"], self.service_host, resource["port"])
            await endpoint.start()
            # Another registration may have raced us while binding.
            if resource["id"] in self.endpoints:
                endpoint.close()
                return self.endpoints[resource["id"]]
            self.endpoints[resource["id"]] = endpoint
            log.info("resource %s (%s): endpoint %s", resource["id"], resource["name"], endpoint.address)
        return endpoint

    def add_agent(self, agent: AgentSession) -> None:
        self.agents.add(agent)
        for resource_id in agent.resources:
            self.endpoints[resource_id].agents.append(agent)

    def remove_agent(self, agent: AgentSession) -> None:
        if agent not in self.agents:
            return
        self.agents.discard(agent)
        for resource_id in agent.resources:
            endpoint = self.endpoints.get(resource_id)
            if endpoint is not None and agent in endpoint.agents:
                endpoint.agents.remove(agent)

    def status(self, resource_id: str) -> str:
        endpoint = self.endpoints.get(resource_id)
        live = endpoint is not None and any(not a.link.is_closing for a in endpoint.agents)
        return "AVAILABLE" if live else "UNAVAILABLE"

    def agents_of(self, resource_id: str) -> list[dict]:
        endpoint = self.endpoints.get(resource_id)
        return [a.describe() for a in endpoint.agents] if endpoint else []

    def drop_agents(self, resource_id: str, below_generation: int) -> int:
        """Disconnect the agents of ``resource_id`` registered with an older token generation."""
        endpoint = self.endpoints.get(resource_id)
        if endpoint is None:
            return 0
        dropped = [a for a in endpoint.agents if a.generation < below_generation]
        for agent in dropped:
            log.info("agent %s: registration token of resource %s revoked, disconnecting", agent.agent_id, resource_id)
            _refuse(agent.link, "revoked", "registration token revoked")
            self.remove_agent(agent)
        return len(dropped)

    def resource_deleted(self, resource_id: str) -> None:
        endpoint = self.endpoints.pop(resource_id, None)
        if endpoint is None:
            return
        endpoint.close()
        for agent in list(endpoint.agents):
            _refuse(agent.link, "deleted", "resource deleted")
            self.remove_agent(agent)

    def close(self) -> None:
        for endpoint in self.endpoints.values():
            endpoint.close()


def _refuse(link: Link, code: str, message: str) -> None:
    """Tell the agent why, then close its link."""
    try:
        link.send_control({"type": "error", "code": code, "message": message})
    except Exception:  # the link may already be closing
        pass
    link.close(ErrorCode.UNAUTHORIZED, message)
