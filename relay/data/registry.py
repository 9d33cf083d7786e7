"""The relay's live registry: which agents serve which resource, and one TCP endpoint per
resource where integration workers connect.

Each resource's endpoint, its agents and its connections are relay.data.endpoints' (which
agent takes a connection, and how long one waits for an agent when none serves it).

A new registration from the same agent process and slot (same customer, ``instance`` and
``slot``) supersedes its older links: they get no new streams and keep the ones they carry (an
``auto://`` agent moving to QUIC, or back to WSS after its QUIC path went silent).

Deregistering one resource from an agent (its token revoked by a rotation, the resource
deleted) ends only that resource there: the agent gets a CONTROL ``deregistered`` message,
the resource's streams on that link are reset, and the link goes on with the agent's other
resources. An agent left with nothing to serve gets an ``error`` and its link is closed.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

from tunnel.carriers.base import Link
from tunnel.ops.logs import Throttled
from tunnel.wire.constants import ErrorCode

from relay import format_host_port
from relay.settings import DEFAULT_RELAY_SETTINGS, RelaySettings
from relay.state import access
from relay.state.relay_state import DEFAULT_PORT_RANGE

from .endpoints import AgentSession, Endpoint
from .metrics import RelayMetrics
from .quotas import Descriptors, PerCustomerRate

log = logging.getLogger("relay.registry")

#: A recurring endpoint condition (no agent, unreachable service) is logged once per this many seconds.
LOG_INTERVAL = 60.0


class Registry:
    """Live agents and endpoints; also what the admin API reads (``relay.control.admin.Registry``).

    ``descriptors`` (optional) accounts for the endpoints' sockets per customer; ``metrics``
    counts their streams (a fresh :class:`relay.data.metrics.RelayMetrics` if not given)."""

    def __init__(self, service_host: str, descriptors: Descriptors | None = None,
                 metrics: RelayMetrics | None = None, settings: RelaySettings | None = None) -> None:
        self.service_host = service_host
        #: Who may reach endpoints whose resource has no list of its own (``--service-allow``;
        #: None: any source).
        self.service_allow: tuple | None = None
        self.descriptors = descriptors
        self.metrics = metrics if metrics is not None else RelayMetrics()
        self.settings = settings or DEFAULT_RELAY_SETTINGS
        #: Where new resources' endpoint ports are chosen (``serve --port-range``).
        self.port_range = DEFAULT_PORT_RANGE
        self.endpoints: dict[str, Endpoint] = {}
        self.agents: set[AgentSession] = set()
        self._links = Counter()  # customer id -> registered agent links
        self.throttled = Throttled(log, LOG_INTERVAL)
        #: What one customer's ``target_health`` reports may log (on top of ``throttled``).
        self._target_lines = PerCustomerRate(self.settings.max_target_log_lines_per_minute)
        #: Where finished worker connections are recorded (relay.data.audit.AuditLog; None: nowhere),
        #: and this relay's id there.
        self.audit = None
        self.relay_id = ""
        #: Takes worker connections no local agent can serve to the relay holding one
        #: (relay.data.peering.Peering, in a cluster); None: they wait here for an agent.
        self.forwarder = None
        #: False once the relay drains: endpoints bound later do not listen.
        self.listening = True
        self._binding: dict[str, asyncio.Future] = {}  # resource id -> bind in progress
        #: Resource id -> why its endpoint cannot be bound here (logged once; ``resources list``
        #: shows it); cleared when a bind succeeds or the resource is deleted.
        self.bind_errors: dict[str, str] = {}
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def links_of(self, customer_id: str) -> int:
        return self._links[customer_id]

    async def ensure_endpoint(self, resource: dict) -> Endpoint:
        # One bind per resource at a time: a registration and the resource_created event
        # (relay.state.cluster) may ask at once, and a second bind of the port would fail.
        binding = self._binding.get(resource["id"])
        while binding is not None:
            await asyncio.shield(binding)
            binding = self._binding.get(resource["id"])
        if resource["id"] in self.endpoints:
            return self.endpoints[resource["id"]]
        done = self._binding[resource["id"]] = asyncio.get_running_loop().create_future()
        try:
            endpoint = await self._bind(resource)
        except OSError as exc:
            why = f"cannot bind {format_host_port(self.service_host, resource['port'])}: {exc.strerror or exc}"
            if self.bind_errors.get(resource["id"]) != why:
                log.error("resource %s (%s): endpoint not served on this relay: %s", resource["id"],
                          resource.get("name"), why)
            self.bind_errors[resource["id"]] = why
            raise
        finally:
            del self._binding[resource["id"]]
            done.set_result(None)
        self.bind_errors.pop(resource["id"], None)
        return endpoint

    async def _bind(self, resource: dict) -> Endpoint:
        endpoint = self.endpoints.get(resource["id"])
        if endpoint is None:
            customer_id = resource["customer_id"]
            if self.descriptors is not None:
                self.descriptors.check(customer_id)
                self.descriptors.take(customer_id)
            endpoint = Endpoint(self, resource["id"], resource["name"], customer_id, self.service_host,
                                resource["port"], _rule(resource["id"], resource.get("allow_cidrs")))
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
        self._supersede(agent)
        self.agents.add(agent)
        self._links[agent.customer_id] += 1
        for resource_id in agent.resources:
            endpoint = self.endpoints[resource_id]
            endpoint.agents.append(agent)
            endpoint.agents_changed()

    def _supersede(self, agent: AgentSession) -> None:
        """The older links of ``agent``'s process and slot take no new streams (module docstring)."""
        if not agent.instance:
            return
        for older in [a for a in self.agents if a.instance == agent.instance and a.slot == agent.slot
                      and a.customer_id == agent.customer_id]:
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
        agent.leaving.discard(resource["id"])
        endpoint = self.endpoints[resource["id"]]
        if agent not in endpoint.agents:
            endpoint.agents.append(agent)
        endpoint.agents_changed()

    def remove_resource(self, agent: AgentSession, resource_id: str, reason: str = "asked") -> None:
        """``agent`` stops serving ``resource_id`` at its own request (``reason``: ``reload``,
        ``stopping``, ``asked``): no new streams; the open ones finish. The last agent here
        leaving so makes the endpoint refuse new connections at once (``Endpoint.released``)."""
        if agent.resources.pop(resource_id, None) is not None:
            agent.targets.pop(resource_id, None)
            self._unroute(agent, [resource_id])
            endpoint = self.endpoints.get(resource_id)
            if endpoint is not None and endpoint.pick_agent() is None:
                endpoint.released = reason

    def leaving_agent(self, resource_id: str) -> AgentSession | None:
        """A live agent that is leaving ``resource_id`` (see ``AgentSession.leaving``)."""
        for agent in self.agents:
            if resource_id in agent.leaving and not agent.link.is_closing:
                return agent
        return None

    def target_health(self, agent: AgentSession, resource_id: str, report: dict) -> None:
        """``agent`` told how ``resource_id``'s private service answers."""
        before = agent.targets.get(resource_id)
        agent.targets[resource_id] = report
        name = agent.resources.get(resource_id, "?")
        if not report["reachable"]:
            self._target_log(agent, ("target", resource_id, agent.agent_id), logging.WARNING,
                             "resource %s (%s): agent %s cannot reach the private service: %s", resource_id, name,
                             agent.agent_id, report["message"])
        elif before is not None and not before["reachable"]:
            self._target_log(agent, None, logging.INFO, "resource %s (%s): agent %s reaches the private service again",
                             resource_id, name, agent.agent_id)

    def _target_log(self, agent: AgentSession, key, level: int, msg: str, *args) -> None:
        """A line about a private service, within its customer's budget
        (``max_target_log_lines_per_minute``): the many resources and agents of one customer
        cannot flood the log, and the others' lines still get through."""
        customer = agent.customer_id
        if key is not None and not self.throttled.would_log(key):
            self.throttled.log(key, level, msg, *args)  # counted, not logged
            return
        if not self._target_lines.take(customer):
            self.throttled.log(("target lines", customer), logging.WARNING,
                               "customer %s: private service reports over %d log lines per minute "
                               "(TUNNEL_MAX_TARGET_LOG_LINES_PER_MINUTE); holding the rest back", customer,
                               self.settings.max_target_log_lines_per_minute)
            return
        if key is None:
            log.log(level, msg, *args)
        else:
            self.throttled.log(key, level, msg, *args)

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
        agent.leaving.discard(resource_id)
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

    def drop_agent(self, agent: AgentSession, code: str, message: str) -> None:
        """End ``agent``'s link (revoked): its streams reset, the agent told why, the link closed."""
        for resource_id in list(agent.resources):
            endpoint = self.endpoints.get(resource_id)
            if endpoint is not None:
                endpoint.end_streams(agent, ErrorCode.UNAUTHORIZED)
        _refuse(agent.link, code, message)
        self.remove_agent(agent)

    def drop_agents(self, resource_id: str, below_generation: int) -> int:
        """Deregister ``resource_id`` from the agents registered with an older token generation."""
        endpoint = self.endpoints.get(resource_id)
        if endpoint is None:
            return 0
        dropped = [a for a in endpoint.agents if a.generation < below_generation]
        for agent in dropped:
            self.deregister(agent, resource_id, "revoked", "registration token revoked")
        return len(dropped)

    def resource_updated(self, resource_id: str, allow_cidrs: str | None) -> None:
        """The resource's source rule changed (on any relay): new connections follow it."""
        endpoint = self.endpoints.get(resource_id)
        if endpoint is not None:
            endpoint.allow = _rule(resource_id, allow_cidrs)
            log.info("resource %s (%s): endpoint open to %s", resource_id, endpoint.name,
                     access.format_cidrs(endpoint.allow_rule) or "any source")

    def resource_deleted(self, resource_id: str) -> None:
        self.bind_errors.pop(resource_id, None)
        endpoint = self.endpoints.pop(resource_id, None)
        if endpoint is None:
            return
        self._close_endpoint(endpoint)
        for agent in list(endpoint.agents):
            self.deregister(agent, resource_id, "deleted", "resource deleted")
        endpoint.end_streams()

    async def stop_listening(self) -> None:
        """Drain: stop accepting worker connections (the ones open, and the ones the kernel
        has queued, go on)."""
        self.listening = False
        await asyncio.gather(*(endpoint.stop_listening() for endpoint in list(self.endpoints.values())))

    def open_connections(self) -> int:
        """Worker connections to this relay's endpoints still open."""
        return sum(len(endpoint.bridges) for endpoint in self.endpoints.values())

    def close(self) -> None:
        for endpoint in self.endpoints.values():
            self._close_endpoint(endpoint)
        for task in list(self._tasks):
            task.cancel()  # connections waiting for an agent are reset


def _rule(resource_id: str, allow_cidrs: str | None) -> tuple | None:
    """The networks of a stored rule; one that does not parse (written by hand into the
    database) lets nobody in rather than everybody."""
    try:
        return access.stored_cidrs(allow_cidrs)
    except ValueError as exc:
        log.error("resource %s: unusable allow list in the state database (%s): refusing every connection",
                  resource_id, exc)
        return ()


def _refuse(link: Link, code: str, message: str) -> None:
    """Tell the agent why, then close its link."""
    try:
        link.send_control({"type": "error", "code": code, "message": message})
    except Exception:  # noqa: BLE001 - the link may already be closing
        pass
    link.close(ErrorCode.UNAUTHORIZED, message)
