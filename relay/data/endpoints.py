"""The relay's resource endpoints: one listening socket per resource, the agent links serving
it (:class:`AgentSession`) and the integration workers' connections (:class:`EndpointBridge`);
the registry (relay.data.registry) keeps them.

Each connection to an endpoint becomes one stream on the link of one of the resource's
agents: one whose private service answers (CONTROL ``target_health``), then the one with the
fewest active streams; when an agent leaves, new connections go to the others.

With no agent here, in a cluster, the connection goes to the relay holding one (relay.data.peering,
relay.data.forward). When no relay serves the resource, a new connection waits: for up to
``RelaySettings.endpoint_hold_timeout`` (5 s), at most ``RelaySettings.endpoint_hold_max`` per resource,
while the resource lost its last agent (or the relay started, or, in a cluster, another relay
last took one of its connections) less than ``RelaySettings.endpoint_hold_window`` ago, and not
because its agents deregistered it on purpose (a config reload without it: then new
connections are refused at once, ``deregistered`` in logs and metrics; after a graceful stop,
which an agent restart begins with, they are held, and refused with that reason when none
comes back). Its bytes
wait in the kernel (reading paused); an agent registering here gets the waiting connections at
once, one registering on another relay within ``HOLD_POLL``. Past those bounds a connection is
reset at once, and the relay logs why, once per interval. A forwarded connection the relay
holding the agent refuses before anything came back (it lost the agent since the look-up)
waits within the same bounds and goes again (relay.data.forward.ForwardHandler).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tunnel.bridge.proxy_protocol import format_worker
from tunnel.bridge.tcp import LinkBuffers, TcpBridge, serve_bridges, stream_handler
from tunnel.carriers.base import Link
from tunnel.wire.constants import ErrorCode
from tunnel.wire.errors import UsageError

from relay.state import access

from .forward import ForwardHandler, Forwarded
from .metrics import reset_reason
from .quotas import QuotaExceeded

if TYPE_CHECKING:
    from .registry import Registry

log = logging.getLogger("relay.registry")

REACHABLE, UNREACHABLE, UNKNOWN = "REACHABLE", "UNREACHABLE", "UNKNOWN"
#: In a cluster, how often a waiting connection asks again which relay holds an agent (s).
HOLD_POLL = 0.5
#: Why agents deregistered a resource (CONTROL ``remove_resources`` ``reason``), as logged
#: when new connections are refused at once for it (not after ``stopping``: those are held).
RELEASE_REASONS = {"reload": "their config no longer has it", "asked": "on request"}


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
    #: ``epoch`` orders the link records of one agent slot across relays (relay.state.cluster).
    instance: str = ""
    slot: int = 0
    epoch: int = 0
    #: What the agent announced it understands (``agent.features`` at auth).
    features: frozenset = frozenset()
    #: When this link last asked for a certificate (monotonic; relay.control.agent_control).
    enrolled_at: float | None = None
    #: The client certificate the link authenticated with (serial, expiry as an aware
    #: datetime); None for a link authenticated by registration token.
    cert_serial: int | None = None
    cert_not_after: object = None
    buffers: LinkBuffers | None = None
    connected_since: float = field(default_factory=time.time)
    active_streams: int = 0
    #: The verified claims of the agent's registration token (adding resources checks them).
    claims: object = None
    #: Resource id -> what the agent last reported of its private service (CONTROL
    #: ``target_health``): {"reachable": bool, "reason", "message", "since"}.
    targets: dict = field(default_factory=dict)
    #: Resources the agent stopped serving (CONTROL ``remove_resources``) while its link's
    #: record is rewritten without them: streams other relays forwarded meanwhile still go
    #: to it (relay.data.peering), local workers' do not.
    leaving: set = field(default_factory=set)
    #: Streams open on the link -> the resource each is for (an EndpointBridge, or a
    #: relay.data.forward.Splice of a stream another relay forwarded); with the bytes of those that
    #: ended, ``resource_bytes`` gives each resource's own bytes.
    flows: dict = field(default_factory=dict)
    done_bytes: Counter = field(default_factory=Counter)  # (resource id, "sent"|"received") -> n

    def flow_done(self, flow) -> None:
        """A stream of the link ended: keep its bytes under its resource."""
        resource_id = self.flows.pop(flow, None)
        if resource_id is not None:
            self.done_bytes[resource_id, "sent"] += flow.bytes_to_agent
            self.done_bytes[resource_id, "received"] += flow.bytes_from_agent

    def resource_bytes(self, resource_id: str) -> tuple[int, int]:
        """Stream payload bytes of ``resource_id`` on this link: (sent to the agent, received)."""
        sent, received = self.done_bytes[resource_id, "sent"], self.done_bytes[resource_id, "received"]
        for flow, rid in self.flows.items():
            if rid == resource_id:
                sent += flow.bytes_to_agent
                received += flow.bytes_from_agent
        return sent, received
    #: Resources of ``add_resources`` messages being added now: they count against the
    #: per-link limit from the check on (relay.control.agent_control).
    adding: int = 0

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
            # How the link authenticated: "certificate" (serial in hex, as logged at issue) or "token".
            "identity": "token" if self.cert_serial is None else "certificate",
            "cert_serial": None if self.cert_serial is None else format(self.cert_serial, "x"),
            "cert_expires_at": _iso_time(self.cert_not_after),
            "connected_since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.connected_since)),
            "bytes_sent": self.link.bytes_sent,
            "bytes_received": self.link.bytes_received,
            "active_streams": self.active_streams,
            "epoch": self.epoch,
        }
        if resource_id is not None:
            # The link's totals cover every resource it serves; each resource row shows its own.
            view["link_bytes_sent"], view["link_bytes_received"] = view["bytes_sent"], view["bytes_received"]
            view["bytes_sent"], view["bytes_received"] = self.resource_bytes(resource_id)
            report = self.targets.get(resource_id) or {}
            view["target_status"] = self.target_status(resource_id)
            view["target_error"] = report.get("message") if report and not report["reachable"] else None
            since = report.get("since")
            view["target_since"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since)) if since else None
        return view


def _iso_time(when) -> str | None:
    """An aware datetime (or Unix seconds) as ``YYYY-MM-DDTHH:MM:SSZ``; None stays None."""
    if when is None:
        return None
    seconds = when.timestamp() if hasattr(when, "timestamp") else float(when)
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


class EndpointBridge(TcpBridge):
    """An integration worker's TCP connection to a resource endpoint."""

    __slots__ = ("_endpoint", "agent", "forwarded", "retry", "opened_at", "worker", "refused", "peer_relay")

    @property
    def bytes_to_agent(self) -> int:
        return self.bytes_from_tcp

    @property
    def bytes_from_agent(self) -> int:
        return self.bytes_to_tcp

    def __init__(self, endpoint: "Endpoint") -> None:
        super().__init__()
        self._endpoint = endpoint
        self.agent: AgentSession | None = None
        #: For the audit log: when the worker connected (Unix seconds), from where, why it
        #: was refused (None: it was not), and whether another relay carried it.
        self.opened_at = 0.0
        self.worker = None
        self.refused: str | None = None
        self.peer_relay = False
        #: While no stream exists yet (waiting for an agent, here or on another relay): what
        #: the worker sent meanwhile (relay.data.forward.Forwarded).
        self.forwarded: Forwarded | None = None
        #: While another relay has not answered this connection's forwarded stream: a copy of
        #: what it was sent, to send again if that relay refuses it (:meth:`forward_refused`).
        self.retry: Forwarded | None = None

    def data_received(self, data: bytes) -> None:
        if self.forwarded is not None:
            self.forwarded.hold(data)
            return
        if self.retry is not None and not self.retry.keep(data):
            self.retry = None
        super().data_received(data)

    def eof_received(self) -> bool:
        if self.forwarded is not None:
            self.forwarded.eof = True
            return True
        if self.retry is not None:
            self.retry.eof = True
        return super().eof_received()

    def connection_made(self, transport: asyncio.Transport) -> None:
        endpoint = self._endpoint
        registry = endpoint.registry
        self.opened_at = time.time()
        peer = transport.get_extra_info("peername")
        self.worker = peer
        if not access.allowed(endpoint.allow_rule, str(peer[0]) if peer else ""):
            self.transport = transport
            registry.throttled.log(("not-allowed", endpoint.resource_id), logging.WARNING,
                                   "resource %s (%s): closing connections from sources outside its allow list "
                                   "(%s), e.g. %s", endpoint.resource_id, endpoint.name,
                                   access.format_cidrs(endpoint.allow_rule), peer[0] if peer else "?")
            self.refuse("not_allowed")
            return
        descriptors = registry.descriptors
        if descriptors is not None:
            try:
                descriptors.check(endpoint.customer_id)
            except QuotaExceeded as exc:
                self.transport = transport
                registry.throttled.log(("descriptors", endpoint.customer_id), logging.WARNING,
                                       "resetting new connections to the endpoints of customer %s: %s",
                                       endpoint.customer_id, exc)
                self.refuse("quota", exc)
                return
            descriptors.take(endpoint.customer_id)
        self.on_done = self._released
        agent = endpoint.pick_agent()
        if agent is not None:
            stream = self._open_on(agent, transport)
            if stream is None:
                self.transport = transport
                self.refuse("link_closing")
                return
            self.attach_stream(stream)
            super().connection_made(transport)
            return
        if registry.forwarder is None and not endpoint.may_hold():
            self.transport = transport
            endpoint.log_refusal()
            self.refuse("no_agent")
            return
        # No agent here: accepted at once; its bytes wait until a stream exists, on another
        # relay's link (relay.data.peering) or on the link of an agent that comes back.
        self.forwarded = Forwarded(self)
        endpoint.bridges.add(self)
        super().connection_made(transport)
        registry.spawn(endpoint.find_agent(self))

    def refuse(self, reason: str, quota=None) -> None:
        """Close the connection at once (``reason`` one of relay.metrics.REFUSALS)."""
        self.refused = reason
        self._endpoint.registry.metrics.stream_refused(self._endpoint, reason, quota)
        audit_now = self.on_done is None  # else _released records it
        self.fail(ErrorCode.REFUSED)
        if audit_now:
            self._audit()

    def _open_on(self, agent: AgentSession, transport: asyncio.Transport | None = None):
        """This connection's stream on ``agent``'s link (None when it began closing)."""
        endpoint = self._endpoint
        try:
            worker = self.worker_field(transport) if "worker_address" in agent.features else b""
            stream = agent.link.open_stream(open_metadata(agent, endpoint.name, worker), stream_handler(self))
        except UsageError:  # the link began closing since it was picked
            return None
        endpoint.registry.metrics.stream_opened(endpoint)
        self.agent = agent
        self.buffers = agent.buffers
        agent.active_streams += 1
        agent.flows[self] = endpoint.resource_id
        endpoint.bridges.add(self)
        return stream

    def worker_field(self, transport: asyncio.Transport | None = None) -> bytes:
        """The worker's address and the endpoint it reached, for OPEN metadata (b"" unknown)."""
        transport = transport or self.transport
        local = transport.get_extra_info("sockname") if transport is not None else None
        return format_worker(self.worker, local) if self.worker and local else b""

    def start_waiting(self) -> None:
        """No relay serves the resource: hold the connection, its bytes in the kernel."""
        if self.transport is not None:
            self.transport.pause_reading()

    def attach_local(self, agent: AgentSession) -> bool:
        """A waiting connection goes to ``agent`` (False when its link began closing)."""
        stream = self._open_on(agent)
        if stream is None:
            return False
        self.forwarded.attach(stream, agent.buffers)
        return True

    def attach_peer(self, stream, buffers) -> None:
        """A waiting connection goes to another relay over ``stream`` (relay.data.peering)."""
        self._endpoint.registry.metrics.stream_opened(self._endpoint)
        self.peer_relay = True
        self.retry = Forwarded(self, self.forwarded.deadline)
        self.forwarded.attach(stream, buffers)

    def forward_refused(self) -> None:
        """The relay holding an agent refused this connection's forwarded stream before
        anything came back: it waits for an agent again (``Endpoint.find_agent``), with what
        the worker sent so far, until the hold deadline counted from the first refusal."""
        endpoint = self._endpoint
        retry, self.retry = self.retry, None
        self.stream = None
        self.peer_relay = False
        if retry.deadline is None:
            retry.deadline = asyncio.get_running_loop().time() + endpoint.registry.settings.endpoint_hold_timeout
        self.forwarded = retry
        log.debug("resource %s: the relay holding its agent refused a forwarded connection; it waits and goes "
                  "again", endpoint.resource_id)
        endpoint.registry.spawn(endpoint.find_agent(self))

    def _released(self) -> None:
        endpoint = self._endpoint
        registry = endpoint.registry
        if self.agent is not None:
            self.agent.active_streams -= 1
            self.agent.flow_done(self)
        endpoint.bridges.discard(self)
        if registry.descriptors is not None:
            registry.descriptors.give(endpoint.customer_id)
        if self.stream is not None:
            registry.metrics.stream_done(endpoint, self)
        self._audit()

    def _audit(self) -> None:
        """One audit line for this connection, now that it ended (relay.data.audit)."""
        registry = self._endpoint.registry
        if registry.audit is None:
            return
        endpoint, agent, worker = self._endpoint, self.agent, self.worker
        code = self.reset_code
        if self.refused is not None:
            end, reason = "refused", self.refused
        elif code is None or code == ErrorCode.NO_ERROR:
            # "no_error": one side closed before the other direction ended (a reset with no error).
            end, reason = "closed", "eof" if code is None else "no_error"
        else:
            end, reason = "reset", reset_reason(code)
        registry.audit.connection(
            opened=self.opened_at, closed=time.time(), customer=endpoint.customer_id,
            resource=endpoint.resource_id, resource_name=endpoint.name,
            worker=worker,
            relay=registry.relay_id, agent_instance=agent.instance if agent is not None else None,
            agent=agent.agent_id if agent is not None else None,
            transport=agent.link.carrier if agent is not None else "relay" if self.peer_relay else None,
            bytes_to_resource=self.bytes_from_tcp, bytes_from_resource=self.bytes_to_tcp, end=end, reason=reason)

    def stream_reset(self, code: int) -> None:
        if code == ErrorCode.CONNECT_FAILED and self.agent is not None:
            self._endpoint.connect_failed(self.agent)
        super().stream_reset(code)


class Endpoint:
    """A resource's listening socket, the agents serving it and the connections waiting for one."""

    def __init__(self, registry: "Registry", resource_id: str, name: str, customer_id: str, host: str,
                 port: int, allow: tuple | None = None) -> None:
        self.registry = registry
        self.resource_id = resource_id
        self.name = name
        self.customer_id = customer_id
        self.host = host
        self.port = port
        #: The resource's own source rule (relay.state.access); None: the relay's default applies.
        self.allow = allow
        self.agents: list[AgentSession] = []
        self.bridges: set[EndpointBridge] = set()
        self.server: asyncio.Server | None = None
        #: Connections held waiting for an agent (module docstring).
        self.waiting: set[EndpointBridge] = set()
        #: Since when no agent serves it (monotonic), None while one does here. In a cluster,
        #: a connection another relay took counts as served too.
        self.agentless_since: float | None = time.monotonic()
        #: Why its last agent here deregistered it on purpose (CONTROL ``remove_resources``:
        #: ``reload``, ``stopping``, ``asked``), until an agent serves it again: new connections
        #: are then refused at once, not held as in an outage; but after a graceful stop (an
        #: agent restarting stops first) they are held as before, and only the reason differs.
        self.released: str | None = None
        self._arrived = asyncio.Event()  # set (and replaced) when an agent comes

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def allow_rule(self) -> tuple | None:
        """The networks that may connect: the resource's own list, else the relay's default."""
        return self.allow if self.allow is not None else self.registry.service_allow

    async def start(self) -> None:
        self.server = await serve_bridges(lambda: EndpointBridge(self), self.host, self.port, backlog=1024)

    async def stop_listening(self) -> None:
        """Drain: take no new worker connection. The ones already queued in the kernel are
        served like the others, not reset (a load balancer would pass a reset on to its
        client as a clean end of stream: an empty reply)."""
        if self.server is not None:
            queued = await self.server.stop()
            if queued:
                log.info("resource %s: endpoint %s closed; %d connection(s) queued there served",
                         self.resource_id, self.address, queued)

    def pick_agent(self) -> AgentSession | None:
        """An agent whose private service answers (as far as it told), then the one with the
        fewest active streams; None when no agent serves the resource."""
        live = [a for a in self.agents if not a.link.is_closing]
        rid = self.resource_id
        return min(live, key=lambda a: (a.target_down(rid), a.active_streams)) if live else None

    # --- connections waiting for an agent ---------------------------------------------

    def may_hold(self) -> bool:
        """Whether a new connection may wait for an agent now (the bounds of the module docstring)."""
        settings = self.registry.settings
        if self.agentless_since is None:  # its agents are all going away
            self.agentless_since = time.monotonic()
        if settings.endpoint_hold_timeout <= 0 or time.monotonic() - self.agentless_since > settings.endpoint_hold_window:
            return False
        if len(self.waiting) >= settings.endpoint_hold_max:
            self.registry.throttled.log(("hold-full", self.resource_id), logging.WARNING,
                                        "resource %s (%s): %d connections already wait for an agent "
                                        "(TUNNEL_ENDPOINT_HOLD_MAX); resetting more", self.resource_id, self.name,
                                        len(self.waiting))
            return False
        return True

    async def find_agent(self, bridge: EndpointBridge) -> None:
        """Take ``bridge`` (accepted, no stream yet) to an agent: through the relay holding
        one (in a cluster), else wait here for one, within the bounds of the module
        docstring; reset it when none comes."""
        registry = self.registry
        peering = registry.forwarder
        loop = asyncio.get_running_loop()
        deadline = bridge.forwarded.deadline  # set when a relay holding an agent refused it
        try:
            if deadline is not None:  # ask again after a while, not at once
                if deadline <= loop.time() or len(self.waiting) >= registry.settings.endpoint_hold_max:
                    registry.throttled.log(("forward-refused", self.resource_id), logging.WARNING,
                                           "resource %s (%s): the relays it was forwarded to refused it (no agent) "
                                           "for %g s (TUNNEL_ENDPOINT_HOLD_TIMEOUT) or %d connections already "
                                           "wait (TUNNEL_ENDPOINT_HOLD_MAX); resetting", self.resource_id, self.name,
                                           registry.settings.endpoint_hold_timeout, len(self.waiting))
                    bridge.refuse("no_agent")
                    return
                self.waiting.add(bridge)
                bridge.start_waiting()
                await self._agent_or_poll(deadline - loop.time(), peering is not None)
            while not bridge.done:  # the worker may close, or the resource go, meanwhile
                if peering is not None:
                    try:
                        target = await peering.open_forward(self.resource_id, ForwardHandler(bridge),
                                                            bridge.worker_field())
                    except Exception:  # noqa: BLE001 - this connection waits or fails, nothing else
                        log.exception("resource %s: forwarding a connection failed", self.resource_id)
                        target = None
                    if bridge.done:
                        if target is not None:
                            target[0].reset(ErrorCode.CONNECTION_RESET)
                        return
                    if target is not None:
                        self.agentless_since = None if self.agentless_since is None else time.monotonic()
                        bridge.attach_peer(*target)
                        return
                agent = self.pick_agent()
                if agent is not None and bridge.attach_local(agent):
                    return
                if deadline is None and self.released is not None and self.released != "stopping":
                    registry.throttled.log(("released", self.resource_id), logging.INFO,
                                           "resource %s (%s): its agents deregistered it (%s); resetting new "
                                           "connections at once", self.resource_id, self.name,
                                           RELEASE_REASONS.get(self.released, self.released))
                    bridge.refuse("deregistered")
                    return
                if deadline is None:
                    if not self.may_hold():
                        self.log_refusal()
                        bridge.refuse("no_agent")
                        return
                    deadline = loop.time() + registry.settings.endpoint_hold_timeout
                    self.waiting.add(bridge)
                    bridge.start_waiting()
                    log.debug("resource %s: a connection waits up to %g s for an agent (%d waiting)",
                              self.resource_id, registry.settings.endpoint_hold_timeout, len(self.waiting))
                left = deadline - loop.time()
                if left <= 0:
                    if self.released == "stopping":
                        registry.throttled.log(("hold-expired", self.resource_id), logging.INFO,
                                               "resource %s (%s): its agents stopped (a graceful stop) and none "
                                               "came back within %g s (TUNNEL_ENDPOINT_HOLD_TIMEOUT); resetting "
                                               "waiting connections", self.resource_id, self.name,
                                               registry.settings.endpoint_hold_timeout)
                    else:
                        registry.throttled.log(("hold-expired", self.resource_id), logging.WARNING,
                                               "resource %s (%s): no agent came within %g s "
                                               "(TUNNEL_ENDPOINT_HOLD_TIMEOUT); resetting waiting connections",
                                               self.resource_id, self.name, registry.settings.endpoint_hold_timeout)
                    bridge.refuse("no_agent" if self.released is None else "deregistered")
                    return
                await self._agent_or_poll(left, peering is not None)
        except asyncio.CancelledError:
            bridge.fail(ErrorCode.REFUSED)
            raise
        finally:
            self.waiting.discard(bridge)

    async def _agent_or_poll(self, left: float, polling: bool) -> None:
        """Wait up to ``left`` s for an agent registering here, which wakes the waiters at once;
        ``HOLD_POLL`` at most when ``polling`` (another relay's agent is found by asking again)."""
        try:
            await asyncio.wait_for(self._arrived.wait(), max(0.0, min(left, HOLD_POLL) if polling else left))
        except asyncio.TimeoutError:
            pass

    def log_refusal(self) -> None:
        since = self.agentless_since
        if since is None:
            why = "its agents are leaving"
        else:
            why = (f"no agent has served it for {time.monotonic() - since:.0f} s (waiting connections are held only "
                   f"{self.registry.settings.endpoint_hold_window:g} s after the last agent left or the relay started)")
        self.registry.throttled.log(("no-agent", self.resource_id), logging.INFO,
                                    "resource %s (%s): %s; resetting new connections at once", self.resource_id,
                                    self.name, why)

    def connect_failed(self, agent: AgentSession) -> None:
        """``agent`` reset a connection because it could not reach the private service."""
        report = agent.targets.get(self.resource_id) or {}
        self.registry.throttled.log(("connect-failed", self.resource_id), logging.WARNING,
                                    "resource %s (%s): a worker's connection was reset: agent %s cannot reach the "
                                    "private service (%s)", self.resource_id, self.name, agent.agent_id,
                                    report.get("message") or "connection failed")

    def agents_changed(self) -> None:
        """Keep ``agentless_since`` current; wake the connections waiting for an agent."""
        if any(not a.link.is_closing for a in self.agents):
            self.agentless_since = None
            self.released = None
            if self.waiting:
                log.info("resource %s (%s): an agent is back; %d waiting connection(s) go to it", self.resource_id,
                         self.name, len(self.waiting))
            self._arrived.set()
            self._arrived = asyncio.Event()
        elif self.agentless_since is None:
            self.agentless_since = time.monotonic()

    def end_streams(self, agent: AgentSession | None = None, code: int = ErrorCode.REFUSED) -> None:
        """Reset the connections to this endpoint (only those riding ``agent``'s link, if given)."""
        for bridge in [b for b in self.bridges if agent is None or b.agent is agent]:
            bridge.fail(code)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None


def open_metadata(agent: AgentSession, name: str, worker: bytes) -> bytes:
    """The OPEN metadata of a stream for ``agent``: the resource name, and the worker's
    address when the agent understands it (docs/PROTOCOL.md, "Worker address")."""
    if worker and "worker_address" in agent.features:
        return name.encode() + b"\0" + worker
    return name.encode()

