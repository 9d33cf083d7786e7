"""The relay's live registry: which agents serve which resource, and one TCP endpoint per
resource where integration workers connect.

Each connection to an endpoint becomes one stream on the link of one of the resource's
agents, chosen by fewest active streams; when an agent leaves, new connections go to the
others. With no agent the connection is refused with a reset.

Deregistering one resource from an agent (its token revoked by a rotation, the resource
deleted) ends only that resource there: the agent gets a CONTROL ``deregistered`` message,
the resource's streams on that link are reset, and the link goes on with the agent's other
resources. An agent left with nothing to serve gets an ``error`` and its link is closed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

from tunnel.bridge.tcp import LinkBuffers, TcpBridge, stream_handler
from tunnel.carriers.base import Link
from tunnel.ops.logs import Throttled
from tunnel.wire.constants import ErrorCode
from tunnel.wire.errors import UsageError

from .metrics import RelayMetrics
from .quotas import Descriptors, QuotaExceeded

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
    buffers: LinkBuffers | None = None
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
            "instance": self.instance,
            "connected_since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.connected_since)),
            "bytes_sent": self.link.bytes_sent,
            "bytes_received": self.link.bytes_received,
            "active_streams": self.active_streams,
            "epoch": self.epoch,
        }


class EndpointBridge(TcpBridge):
    """An integration worker's TCP connection to a resource endpoint."""

    __slots__ = ("_endpoint", "agent")

    def __init__(self, endpoint: "Endpoint") -> None:
        super().__init__()
        self._endpoint = endpoint
        self.agent: AgentSession | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        endpoint = self._endpoint
        registry = endpoint.registry
        descriptors = registry.descriptors
        if descriptors is not None:
            try:
                descriptors.check(endpoint.customer_id)
            except QuotaExceeded as exc:
                self.transport = transport
                registry.throttled.log(("descriptors", endpoint.customer_id), logging.WARNING,
                                       "resetting new connections to the endpoints of customer %s: %s",
                                       endpoint.customer_id, exc)
                registry.metrics.stream_refused(endpoint, "quota", exc)
                self.fail(ErrorCode.REFUSED)
                return
            descriptors.take(endpoint.customer_id)
        agent = endpoint.pick_agent()
        stream = None
        if agent is not None:
            try:
                stream = agent.link.open_stream(endpoint.name.encode(), stream_handler(self))
            except UsageError:  # the link began closing since it was picked
                pass
        if stream is None:
            self.transport = transport
            if agent is None:
                log.info("resource %s: no agent available, refusing a connection", endpoint.resource_id)
            if descriptors is not None:
                descriptors.give(endpoint.customer_id)
            registry.metrics.stream_refused(endpoint, "no_agent" if agent is None else "link_closing")
            self.fail(ErrorCode.REFUSED)
            return
        registry.metrics.stream_opened(endpoint)
        self.agent = agent
        self.buffers = agent.buffers
        agent.active_streams += 1
        endpoint.bridges.add(self)

        def done() -> None:
            agent.active_streams -= 1
            endpoint.bridges.discard(self)
            if descriptors is not None:
                descriptors.give(endpoint.customer_id)
            registry.metrics.stream_done(endpoint, self)

        self.on_done = done
        self.attach_stream(stream)
        super().connection_made(transport)


class Endpoint:
    """A resource's listening socket and the agents serving it."""

    def __init__(self, registry: "Registry", resource_id: str, name: str, customer_id: str, host: str,
                 port: int) -> None:
        self.registry = registry
        self.resource_id = resource_id
        self.name = name
        self.customer_id = customer_id
        self.host = host
        self.port = port
        self.agents: list[AgentSession] = []
        self.bridges: set[EndpointBridge] = set()
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

    def end_streams(self, agent: AgentSession | None = None, code: int = ErrorCode.REFUSED) -> None:
        """Reset the connections to this endpoint (only those riding ``agent``'s link, if given)."""
        for bridge in [b for b in self.bridges if agent is None or b.agent is agent]:
            bridge.fail(code)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None


class Registry:
    """Live agents and endpoints; also what the admin API reads (``relay.admin.Registry``).

    ``descriptors`` (optional) accounts for the endpoints' sockets per customer; ``metrics``
    counts their streams (a fresh :class:`relay.metrics.RelayMetrics` if not given)."""

    def __init__(self, service_host: str, descriptors: Descriptors | None = None,
                 metrics: RelayMetrics | None = None) -> None:
        self.service_host = service_host
        self.descriptors = descriptors
        self.metrics = metrics if metrics is not None else RelayMetrics()
        self.endpoints: dict[str, Endpoint] = {}
        self.agents: set[AgentSession] = set()
        self._links = Counter()  # customer id -> registered agent links
        self.throttled = Throttled(log)

    def links_of(self, customer_id: str) -> int:
        return self._links[customer_id]

    async def ensure_endpoint(self, resource: dict) -> Endpoint:
        endpoint = self.endpoints.get(resource["id"])
        if endpoint is None:
            customer_id = resource["customer_id"]
            if self.descriptors is not None:
                self.descriptors.check(customer_id)
                self.descriptors.take(customer_id)
            endpoint = Endpoint(self, resource["id"], resource["name"], customer_id, self.service_host,
                                resource["port"])
            try:
                await endpoint.start()
            except BaseException:
                if self.descriptors is not None:
                    self.descriptors.give(customer_id)
                raise
            # Another registration may have raced us while binding.
            if resource["id"] in self.endpoints:
                self._close_endpoint(endpoint)
                return self.endpoints[resource["id"]]
            self.endpoints[resource["id"]] = endpoint
            log.info("resource %s (%s): endpoint %s", resource["id"], resource["name"], endpoint.address)
        return endpoint

    def _close_endpoint(self, endpoint: Endpoint) -> None:
        if endpoint.server is not None and self.descriptors is not None:
            self.descriptors.give(endpoint.customer_id)
        endpoint.close()

    def add_agent(self, agent: AgentSession) -> None:
        self.agents.add(agent)
        self._links[agent.customer_id] += 1
        for resource_id in agent.resources:
            self.endpoints[resource_id].agents.append(agent)

    def remove_agent(self, agent: AgentSession) -> None:
        if agent not in self.agents:
            return
        self.agents.discard(agent)
        self._links[agent.customer_id] -= 1
        if self._links[agent.customer_id] <= 0:
            del self._links[agent.customer_id]
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

    def deregister(self, agent: AgentSession, resource_id: str, code: str, message: str) -> None:
        """End ``resource_id`` on ``agent`` only: tell it why, reset the resource's streams on
        its link; an agent left with no resource is refused and its link closed."""
        name = agent.resources.pop(resource_id, None)
        if name is None:
            return
        endpoint = self.endpoints.get(resource_id)
        if endpoint is not None:
            if agent in endpoint.agents:
                endpoint.agents.remove(agent)
            endpoint.end_streams(agent, ErrorCode.UNAUTHORIZED)
        if not agent.resources:
            log.info("agent %s: %s (resource %s, its last); disconnecting", agent.agent_id, message, resource_id)
            _refuse(agent.link, code, message)
            self.remove_agent(agent)
            return
        log.info("agent %s: %s (resource %s); its other resources go on", agent.agent_id, message, resource_id)
        try:
            agent.link.send_control({"type": "deregistered", "resource": {"id": resource_id, "name": name},
                                     "code": code, "message": message})
        except Exception:  # noqa: BLE001 - the link may be closing; its end removes the agent
            pass

    def drop_agents(self, resource_id: str, below_generation: int) -> int:
        """Deregister ``resource_id`` from the agents registered with an older token generation."""
        endpoint = self.endpoints.get(resource_id)
        if endpoint is None:
            return 0
        dropped = [a for a in endpoint.agents if a.generation < below_generation]
        for agent in dropped:
            self.deregister(agent, resource_id, "revoked", "registration token revoked")
        return len(dropped)

    def resource_deleted(self, resource_id: str) -> None:
        endpoint = self.endpoints.pop(resource_id, None)
        if endpoint is None:
            return
        self._close_endpoint(endpoint)
        for agent in list(endpoint.agents):
            self.deregister(agent, resource_id, "deleted", "resource deleted")
        endpoint.end_streams()

    def close(self) -> None:
        for endpoint in self.endpoints.values():
            self._close_endpoint(endpoint)


def _refuse(link: Link, code: str, message: str) -> None:
    """Tell the agent why, then close its link."""
    try:
        link.send_control({"type": "error", "code": code, "message": message})
    except Exception:  # noqa: BLE001 - the link may already be closing
        pass
    link.close(ErrorCode.UNAUTHORIZED, message)
