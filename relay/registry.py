"""The relay's live registry: which agents serve which resource, and one TCP endpoint per
resource where integration workers connect.

Each connection to an endpoint becomes one stream on the link of one of the resource's
agents: one whose private service answers (CONTROL ``target_health``), then the one with the
fewest active streams; when an agent leaves, new connections go to the others.

With no agent, a new connection waits: for up to ``Limits.endpoint_hold_timeout`` (5 s), at
most ``Limits.endpoint_hold_max`` per resource, while the resource lost its last agent (or the
relay started) less than ``Limits.endpoint_hold_window`` ago. Its bytes wait in the kernel
(reading paused); the first agent that registers gets the waiting connections in order. Past
those bounds a connection is reset at once, and the relay logs why, once per interval.

A new registration from the same agent process (same customer and ``instance``) supersedes its
older links: they get no new streams and keep the ones they carry (an ``auto://`` agent moving
to QUIC, or back to WSS after its QUIC path went silent).

Deregistering one resource from an agent (its token revoked by a rotation, the resource
deleted) ends only that resource there: the agent gets a CONTROL ``deregistered`` message,
the resource's streams on that link are reset, and the link goes on with the agent's other
resources. An agent left with nothing to serve gets an ``error`` and its link is closed.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

from tunnel.bridge.tcp import LinkBuffers, TcpBridge, stream_handler
from tunnel.carriers.base import Link
from tunnel.core.limits import DEFAULT_LIMITS, Limits
from tunnel.ops.logs import Throttled
from tunnel.wire.constants import ErrorCode
from tunnel.wire.errors import UsageError

from .quotas import Descriptors, QuotaExceeded
from .state import DEFAULT_PORT_RANGE

log = logging.getLogger("relay.registry")

#: A recurring endpoint condition (no agent, unreachable service) is logged once per this many seconds.
LOG_INTERVAL = 60.0
REACHABLE, UNREACHABLE, UNKNOWN = "REACHABLE", "UNREACHABLE", "UNKNOWN"


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
    instance: str = ""
    buffers: LinkBuffers | None = None
    connected_since: float = field(default_factory=time.time)
    active_streams: int = 0
    #: The verified claims of the agent's registration token (adding resources checks them).
    claims: object = None
    #: Resource id -> what the agent last reported of its private service (CONTROL
    #: ``target_health``): {"reachable": bool, "reason", "message", "since"}.
    targets: dict = field(default_factory=dict)

    def target_down(self, resource_id: str) -> bool:
        """True when the agent reported that it cannot reach ``resource_id``'s service."""
        report = self.targets.get(resource_id)
        return report is not None and not report["reachable"]

    def target_status(self, resource_id: str) -> str:
        report = self.targets.get(resource_id)
        if report is None:
            return UNKNOWN
        return REACHABLE if report["reachable"] else UNREACHABLE

    def describe(self, resource_id: str | None = None) -> dict:
        """The agent as ``resources list --extended`` shows it (with its view of
        ``resource_id``'s private service when given)."""
        host, port = self.link.peer_address[:2]
        view = {
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
        }
        if resource_id is not None:
            report = self.targets.get(resource_id) or {}
            view["target_status"] = self.target_status(resource_id)
            view["target_error"] = report.get("message") if report and not report["reachable"] else None
            since = report.get("since")
            view["target_since"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since)) if since else None
        return view


class EndpointBridge(TcpBridge):
    """An integration worker's TCP connection to a resource endpoint."""

    __slots__ = ("_endpoint", "agent", "held_until", "_early")

    def __init__(self, endpoint: "Endpoint") -> None:
        super().__init__()
        self._endpoint = endpoint
        self.agent: AgentSession | None = None
        #: While waiting for an agent: until when (loop time).
        self.held_until: float | None = None
        #: What a waiting connection sent before its reading paused (uvloop reads once right
        #: after connection_made, whatever it was told): one read at most.
        self._early: list[bytes] = []

    def data_received(self, data: bytes) -> None:
        if self.held_until is not None:
            self._early.append(bytes(data))
            self.transport.pause_reading()
            return
        super().data_received(data)

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
                self.fail(ErrorCode.REFUSED)
                return
            descriptors.take(endpoint.customer_id)
        self.on_done = self._released
        agent = endpoint.pick_agent()
        if agent is None and endpoint.hold(self, transport):
            return
        self._start(agent, transport)

    def _start(self, agent: "AgentSession | None", transport: asyncio.Transport) -> None:
        """Open this connection's stream on ``agent``'s link (reset it when there is none)."""
        endpoint = self._endpoint
        stream = None
        if agent is not None:
            try:
                stream = agent.link.open_stream(endpoint.name.encode(), stream_handler(self))
            except UsageError:  # the link began closing since it was picked
                pass
        if stream is None:
            self.transport = transport
            if agent is None:
                endpoint.log_refusal()
            self.fail(ErrorCode.REFUSED)
            return
        self.agent = agent
        self.buffers = agent.buffers
        agent.active_streams += 1
        endpoint.bridges.add(self)
        self.attach_stream(stream)
        super().connection_made(transport)
        if self.held_until is not None:
            self.held_until = None
            early, self._early = self._early, []
            for data in early:
                stream.write(data)
            if self._tcp_eof:  # the worker half-closed while waiting
                stream.write_eof()
            if not stream.paused:
                transport.resume_reading()

    def _released(self) -> None:
        endpoint = self._endpoint
        if self.agent is not None:
            self.agent.active_streams -= 1
        endpoint.bridges.discard(self)
        endpoint.unhold(self)
        if endpoint.registry.descriptors is not None:
            endpoint.registry.descriptors.give(endpoint.customer_id)

    def stream_reset(self, code: int) -> None:
        if code == ErrorCode.CONNECT_FAILED and self.agent is not None:
            self._endpoint.connect_failed(self.agent)
        super().stream_reset(code)


class Endpoint:
    """A resource's listening socket, the agents serving it and the connections waiting for one."""

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
        #: Connections waiting for an agent, oldest first.
        self.held: collections.OrderedDict[EndpointBridge, asyncio.Transport] = collections.OrderedDict()
        #: Since when no agent serves it (monotonic), None while one does.
        self.agentless_since: float | None = time.monotonic()
        #: Connections reset because the agent could not reach the private service: the
        #: counter metrics read.
        self.connect_failures = 0
        self._hold_timer: asyncio.TimerHandle | None = None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: EndpointBridge(self), self.host, self.port,
                                               reuse_address=True, backlog=1024)

    def pick_agent(self) -> AgentSession | None:
        """An agent whose private service answers (as far as it told), then the one with the
        fewest active streams; None when no agent serves the resource."""
        live = [a for a in self.agents if not a.link.is_closing]
        rid = self.resource_id
        return min(live, key=lambda a: (a.target_down(rid), a.active_streams)) if live else None

    # --- connections waiting for an agent ---------------------------------------------

    def hold(self, bridge: EndpointBridge, transport: asyncio.Transport) -> bool:
        """Keep ``bridge`` waiting for an agent, reading paused; False when the bounds say
        reset it now (see the module docstring)."""
        limits = self.registry.limits
        if self.agentless_since is None:  # its agents are all going away
            self.agentless_since = time.monotonic()
        if limits.endpoint_hold_timeout <= 0 or time.monotonic() - self.agentless_since > limits.endpoint_hold_window:
            return False
        if len(self.held) >= limits.endpoint_hold_max:
            self.registry.throttled.log(("hold-full", self.resource_id), logging.WARNING,
                                        "resource %s (%s): %d connections already wait for an agent "
                                        "(TUNNEL_ENDPOINT_HOLD_MAX); resetting more", self.resource_id, self.name,
                                        len(self.held))
            return False
        transport.pause_reading()  # its bytes wait in the kernel
        bridge.transport = transport  # so that a reset reaches it
        loop = asyncio.get_running_loop()
        bridge.held_until = loop.time() + limits.endpoint_hold_timeout
        self.held[bridge] = transport
        if self._hold_timer is None:
            self._hold_timer = loop.call_at(bridge.held_until, self._hold_expired)
        log.debug("resource %s: a connection waits up to %g s for an agent (%d waiting)", self.resource_id,
                  limits.endpoint_hold_timeout, len(self.held))
        return True

    def unhold(self, bridge: EndpointBridge) -> None:
        self.held.pop(bridge, None)
        if not self.held and self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None

    def release_held(self) -> None:
        """An agent serves the resource now: hand it the waiting connections, oldest first."""
        if self.held:
            log.info("resource %s (%s): an agent is back; %d waiting connection(s) go to it", self.resource_id,
                     self.name, len(self.held))
        while self.held:
            agent = self.pick_agent()
            if agent is None:
                return
            bridge, transport = self.held.popitem(last=False)
            bridge._start(agent, transport)
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None

    def _hold_expired(self) -> None:
        self._hold_timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        expired = []
        for bridge in self.held:
            if bridge.held_until > now:
                break
            expired.append(bridge)
        if expired:
            self.registry.throttled.log(("hold-expired", self.resource_id), logging.WARNING,
                                        "resource %s (%s): no agent came within %g s (TUNNEL_ENDPOINT_HOLD_TIMEOUT);"
                                        " resetting %d waiting connection(s)", self.resource_id, self.name,
                                        self.registry.limits.endpoint_hold_timeout, len(expired))
        for bridge in expired:
            self.held.pop(bridge, None)
            bridge.held_until = None
            bridge.fail(ErrorCode.REFUSED)
        if self.held:
            self._hold_timer = loop.call_at(next(iter(self.held)).held_until, self._hold_expired)

    def log_refusal(self) -> None:
        since = self.agentless_since
        if since is None:
            why = "its agents are leaving"
        else:
            why = (f"no agent has served it for {time.monotonic() - since:.0f} s (waiting connections are held only "
                   f"{self.registry.limits.endpoint_hold_window:g} s after the last agent left or the relay started)")
        self.registry.throttled.log(("no-agent", self.resource_id), logging.INFO,
                                    "resource %s (%s): %s; resetting new connections at once", self.resource_id,
                                    self.name, why)

    def connect_failed(self, agent: AgentSession) -> None:
        """``agent`` reset a connection because it could not reach the private service."""
        self.connect_failures += 1
        report = agent.targets.get(self.resource_id) or {}
        self.registry.throttled.log(("connect-failed", self.resource_id), logging.WARNING,
                                    "resource %s (%s): a worker's connection was reset: agent %s cannot reach the "
                                    "private service (%s)", self.resource_id, self.name, agent.agent_id,
                                    report.get("message") or "connection failed")

    def agents_changed(self) -> None:
        """Keep ``agentless_since`` current; hand waiting connections to a new agent."""
        if any(not a.link.is_closing for a in self.agents):
            self.agentless_since = None
            self.release_held()
        elif self.agentless_since is None:
            self.agentless_since = time.monotonic()

    def end_streams(self, agent: AgentSession | None = None, code: int = ErrorCode.REFUSED) -> None:
        """Reset the connections to this endpoint (only those riding ``agent``'s link, if given)."""
        for bridge in [b for b in self.bridges if agent is None or b.agent is agent]:
            bridge.fail(code)
        if agent is None:
            for bridge in list(self.held):
                bridge.fail(code)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None


class Registry:
    """Live agents and endpoints; also what the admin API reads (``relay.admin.Registry``).

    ``descriptors`` (optional) accounts for the endpoints' sockets per customer."""

    def __init__(self, service_host: str, descriptors: Descriptors | None = None, limits: Limits | None = None,
                 port_range: tuple[int, int] = DEFAULT_PORT_RANGE) -> None:
        self.service_host = service_host
        self.descriptors = descriptors
        self.limits = limits or DEFAULT_LIMITS
        #: Where new resources' endpoint ports are chosen (``serve --port-range``).
        self.port_range = port_range
        self.endpoints: dict[str, Endpoint] = {}
        self.agents: set[AgentSession] = set()
        self._links = Counter()  # customer id -> registered agent links
        self.throttled = Throttled(log, LOG_INTERVAL)
        self._tasks: set[asyncio.Task] = set()

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

    def bind_soon(self, resource: dict) -> None:
        """Bind ``resource``'s endpoint in the background (a resource an operator created)."""
        async def bind() -> None:
            try:
                await self.ensure_endpoint(resource)
            except (OSError, QuotaExceeded) as exc:
                log.error("resource %s: endpoint %s:%s not bound: %s", resource["id"], self.service_host,
                          resource["port"], getattr(exc, "strerror", None) or exc)

        task = asyncio.get_running_loop().create_task(bind())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def add_agent(self, agent: AgentSession) -> None:
        self._supersede(agent)
        self.agents.add(agent)
        self._links[agent.customer_id] += 1
        for resource_id in agent.resources:
            endpoint = self.endpoints[resource_id]
            endpoint.agents.append(agent)
            endpoint.agents_changed()

    def _supersede(self, agent: AgentSession) -> None:
        """The older links of ``agent``'s process take no new streams (module docstring)."""
        if not agent.instance:
            return
        for older in [a for a in self.agents if a.instance == agent.instance and a.customer_id == agent.customer_id]:
            log.info("agent %s: superseded by %s (the same agent on a new %s link); its %d open stream(s) finish "
                     "on the old one", older.agent_id, agent.agent_id, agent.link.carrier, older.active_streams)
            self._unroute(older, list(older.resources))

    def _unroute(self, agent: AgentSession, resource_ids) -> None:
        """No new streams of ``resource_ids`` go to ``agent``; its open ones carry on."""
        for resource_id in resource_ids:
            endpoint = self.endpoints.get(resource_id)
            if endpoint is not None and agent in endpoint.agents:
                endpoint.agents.remove(agent)
                endpoint.agents_changed()

    def add_resource(self, agent: AgentSession, resource: dict) -> None:
        """``agent`` serves ``resource`` too from now on (registered on its live link)."""
        agent.resources[resource["id"]] = resource["name"]
        endpoint = self.endpoints[resource["id"]]
        if agent not in endpoint.agents:
            endpoint.agents.append(agent)
        endpoint.agents_changed()

    def remove_resource(self, agent: AgentSession, resource_id: str) -> None:
        """``agent`` stops serving ``resource_id`` at its own request: no new streams; the
        open ones finish."""
        if agent.resources.pop(resource_id, None) is not None:
            agent.targets.pop(resource_id, None)
            self._unroute(agent, [resource_id])

    def target_health(self, agent: AgentSession, resource_id: str, report: dict) -> None:
        """``agent`` told how ``resource_id``'s private service answers."""
        before = agent.targets.get(resource_id)
        agent.targets[resource_id] = report
        name = agent.resources.get(resource_id, "?")
        if not report["reachable"]:
            self.throttled.log(("target", resource_id, agent.agent_id), logging.WARNING,
                               "resource %s (%s): agent %s cannot reach the private service: %s", resource_id, name,
                               agent.agent_id, report["message"])
        elif before is not None and not before["reachable"]:
            log.info("resource %s (%s): agent %s reaches the private service again", resource_id, name,
                     agent.agent_id)

    def remove_agent(self, agent: AgentSession) -> None:
        if agent not in self.agents:
            return
        self.agents.discard(agent)
        self._links[agent.customer_id] -= 1
        if self._links[agent.customer_id] <= 0:
            del self._links[agent.customer_id]
        self._unroute(agent, list(agent.resources))

    def status(self, resource_id: str) -> str:
        endpoint = self.endpoints.get(resource_id)
        live = endpoint is not None and any(not a.link.is_closing for a in endpoint.agents)
        return "AVAILABLE" if live else "UNAVAILABLE"

    def agents_of(self, resource_id: str) -> list[dict]:
        endpoint = self.endpoints.get(resource_id)
        return [a.describe(resource_id) for a in endpoint.agents] if endpoint else []

    def deregister(self, agent: AgentSession, resource_id: str, code: str, message: str) -> None:
        """End ``resource_id`` on ``agent`` only: tell it why, reset the resource's streams on
        its link; an agent left with no resource is refused and its link closed."""
        name = agent.resources.pop(resource_id, None)
        if name is None:
            return
        agent.targets.pop(resource_id, None)
        endpoint = self.endpoints.get(resource_id)
        if endpoint is not None:
            if agent in endpoint.agents:
                endpoint.agents.remove(agent)
                endpoint.agents_changed()
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
            for bridge in list(endpoint.held):
                bridge.fail(ErrorCode.REFUSED)


def _refuse(link: Link, code: str, message: str) -> None:
    """Tell the agent why, then close its link."""
    try:
        link.send_control({"type": "error", "code": code, "message": message})
    except Exception:  # noqa: BLE001 - the link may already be closing
        pass
    link.close(ErrorCode.UNAUTHORIZED, message)
