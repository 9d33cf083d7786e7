"""The agent's metrics and health: ``/metrics``, ``/live`` and ``/ready`` at ``METRICS_LISTEN``
(off by default; docs/METRICS.md lists every series). Imported only when it is set: an agent
without it loads nothing of this.

The runner reports what happens with one call each (connecting, registered, waiting to
reconnect, a stream dialling its target); the rest (round trip, bytes, open streams) is read
from the links at scrape time, over every slot (``RELAY_LINKS``). Labels: ``relay`` is the
``host:port`` of the relay a slot is linked to or dials (a ``RELAY_URL`` entry, or a relay of
the cluster as the relays advertise it: at most 64, agent.links), ``resource`` and ``target``
come from the agent's own configuration, ``reason`` is a fixed word; nothing else the relay
sends becomes a label.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections import Counter
from functools import partial

from tunnel import __version__
from tunnel.carriers.base import Link
from tunnel.core.limits import Limits
from tunnel.ops.exposition import Family, process_families, render
from tunnel.ops.metrics_http import OpsServer, serve_ops

from .settings import AgentSettings

#: The states of the agent's link to its relay.
STATES = ("connecting", "registered", "waiting")
TRANSPORTS = ("wss", "quic")
#: Why a dial to a private service failed.
DIAL_REASONS = ("refused", "timeout", "unreachable", "dns", "other")
_UNREACHABLE = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN}


def dial_reason(exc: BaseException) -> str:
    """The ``reason`` label of a failed dial."""
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, socket.gaierror):
        return "dns"
    if isinstance(exc, OSError) and exc.errno in _UNREACHABLE:
        return "unreachable"
    return "other"


def relay_label(dialer) -> str:
    """The ``relay`` label of a dialler: the ``host:port`` it dials (no scheme, path or user info)."""
    host = f"[{dialer.host}]" if ":" in dialer.host else dialer.host
    return f"{host}:{dialer.port}"


class SlotMetrics:
    """What one slot of the agent (one link at a time, agent.links) reports, as the runner's
    ``metrics``; :class:`AgentMetrics` reads every slot's at scrape time."""

    def __init__(self, shared: AgentMetrics, agent) -> None:
        self.shared = shared
        self.agent = agent
        self.state = "connecting"
        self.reconnects: Counter = Counter()  # relay -> n
        #: Registered links not closed yet -> the relay each is linked to.
        self.links: dict[Link, str] = {}

    @property
    def relay(self) -> str:
        """The relay this slot holds or dials now."""
        return relay_label(self.agent.dialer)

    # --- events (one call each from the runner) -----------------------------------------

    def connecting(self) -> None:
        self.state = "connecting"

    def registered(self, link: Link) -> None:
        self.state = "registered"
        if link not in self.links:
            self.links[link] = self.relay
            self.shared.keep_bytes(self, link)

    def waiting(self) -> None:
        """The link is down (or was refused); the slot reconnects after its backoff."""
        self.state = "waiting"
        self.reconnects[self.relay] += 1

    def stream_dialing(self, name: str, task: asyncio.Task) -> None:
        self.shared.stream_dialing(name, task)

    def live(self) -> list[Link]:
        """This slot's registered links that are not closing."""
        return [link for link in self.links if not link.is_closing]


#: Which state a relay shows when two slots report on it (a slot waiting for a free relay
#: keeps the label of the last one it dialled): the furthest along.
_STATE_RANK = {"waiting": 0, "connecting": 1, "registered": 2}


class AgentMetrics:
    """What the agent counts and exports, over every slot: ``agents`` are the slots'
    :class:`agent.runner.Agent` (each gets its :class:`SlotMetrics` as ``metrics``); series
    with a ``relay`` label are per relay a slot is or was linked to."""

    def __init__(self, agents) -> None:
        self.agents = list(agents)
        self.slots = [SlotMetrics(self, agent) for agent in self.agents]
        for agent, slot in zip(self.agents, self.slots):
            agent.metrics = slot
        self.opened: Counter = Counter()  # resource -> streams
        self.dial_failures: Counter = Counter()  # (resource, target, reason) -> n
        #: Bytes of the links that closed: (relay, direction) -> n.
        self.closed_bytes: Counter = Counter()
        self._tasks: set[asyncio.Task] = set()

    @property
    def config(self):
        """The agent's configuration (its resources)."""
        return self.agents[0].config  # a reload gives every slot the same

    def stream_dialing(self, name: str, task: asyncio.Task) -> None:
        """A stream for resource ``name`` arrived on any slot; ``task`` dials its target
        (:func:`tunnel.bridge.tcp.dial_bridge`, whose result says why it failed)."""
        self.opened[name] += 1
        target = self.config.target(name)
        where = f"{target.host}:{target.port}" if target is not None else ""
        task.add_done_callback(partial(self._dialed, name, where))

    def _dialed(self, name: str, where: str, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        exc = task.exception() or task.result()
        if exc is not None:
            self.dial_failures[name, where, dial_reason(exc)] += 1

    def keep_bytes(self, slot: SlotMetrics, link: Link) -> None:
        """Keep ``link``'s byte counts under its relay once it closes."""
        task = asyncio.get_running_loop().create_task(self._keep_bytes(slot, link))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _keep_bytes(self, slot: SlotMetrics, link: Link) -> None:
        """Once ``link`` is over, move its byte counts to its relay's totals."""
        try:
            await link.wait_closed()
        finally:
            relay = slot.links.pop(link)
            self.closed_bytes[relay, "sent"] += link.bytes_sent
            self.closed_bytes[relay, "received"] += link.bytes_received

    # --- exposition ---------------------------------------------------------------------

    def ready(self) -> str | None:
        """None once a slot is registered with a live link; else why not."""
        if any(slot.state == "registered" and slot.live() for slot in self.slots):
            return None
        states = sorted({slot.state for slot in self.slots}, key=_STATE_RANK.get, reverse=True)
        return f"not registered with the relay ({', '.join(states)})"

    def families(self) -> list[Family]:
        states: dict[str, str] = {}
        riding: dict[str, str] = {}
        rtts: dict[str, float] = {}
        active: Counter = Counter()
        moved: Counter = Counter(self.closed_bytes)
        reconnects: Counter = Counter()
        for slot in self.slots:
            relay = slot.relay
            if _STATE_RANK[slot.state] >= _STATE_RANK.get(states.get(relay, "waiting"), 0):
                states[relay] = slot.state
            reconnects.update(slot.reconnects)
            live = slot.live()
            current = slot.agent.link
            if current is not None and current in live:
                riding[slot.links[current]] = current.carrier
                if current.rtt is not None:
                    rtts[slot.links[current]] = current.rtt
            for link, link_relay in slot.links.items():
                moved[link_relay, "sent"] += link.bytes_sent
                moved[link_relay, "received"] += link.bytes_received
                if not link.is_closing:
                    active[link_relay] += link.stream_count
        relays = sorted({*states, *riding, *reconnects, *active, *(relay for relay, _ in moved)})
        state = Family("tunnel_agent_link_state", "gauge",
                       "Each relay the agent links to: 1 for the state of its link.", ("relay", "state"))
        transport = Family("tunnel_agent_link_transport", "gauge",
                           "1 for the transport the registered link to each relay rides.", ("relay", "transport"))
        reconnect = Family("tunnel_agent_reconnects_total", "counter",
                           "Times the agent lost (or could not get) a link and dialled the relay again.", ("relay",))
        rtt = Family("tunnel_agent_link_rtt_seconds", "gauge",
                     "The last round trip a keepalive PING measured on the current link to each relay.", ("relay",))
        streams = Family("tunnel_agent_streams_active", "gauge", "Streams open now, per relay.", ("relay",))
        moved_family = Family("tunnel_agent_link_bytes_total", "counter",
                              "Stream payload bytes over the agent's links, sent to and received from each relay.",
                              ("relay", "direction"))
        for relay in relays:
            if relay in states:
                for name in STATES:
                    state.add((relay, name), int(name == states[relay]))
                for name in sorted({*TRANSPORTS, *([riding[relay]] if relay in riding else [])}):
                    transport.add((relay, name), int(name == riding.get(relay)))
            reconnect.add((relay,), reconnects[relay])
            if relay in rtts:
                rtt.add((relay,), rtts[relay])
            streams.add((relay,), active[relay])
            moved_family.add((relay, "sent"), moved[relay, "sent"]).add((relay, "received"), moved[relay, "received"])
        opened = Family("tunnel_agent_streams_opened_total", "counter",
                        "Streams the relays opened, per resource.", ("resource",))
        failures = Family("tunnel_agent_dial_failures_total", "counter",
                          "Dials to a private service that failed, per resource, target and reason.",
                          ("resource", "target", "reason"))
        failed = Counter(self.dial_failures)
        for target in self.config.targets:
            opened.add((target.name,), self.opened[target.name])
            for reason in DIAL_REASONS:
                failed[target.name, f"{target.host}:{target.port}", reason] += 0
        for labels, n in sorted(failed.items()):
            failures.add(labels, n)
        reachable = Family("tunnel_agent_target_reachable", "gauge",
                           "1 while the resource's private service answers, 0 while it does not (agent.health: "
                           "the last dial or check); absent before the first.", ("resource",))
        health = getattr(self.agents[0], "health", None)
        for target in self.config.targets:
            known = health.states.get(target.name) if health is not None else None
            if known is not None and known.reachable is not None:
                reachable.add((target.name,), int(known.reachable))
        info = Family("tunnel_agent_build_info", "gauge", "The agent's version.", ("version",)).add((__version__,), 1)
        return [state, transport, reconnect, rtt, streams, moved_family, opened, failures, reachable, info,
                *process_families()]

    def render(self) -> bytes:
        return render(self.families())


async def serve_metrics(agents, address: tuple[str, int], limits: Limits, settings: AgentSettings) -> OpsServer:
    """Give every slot of ``agents`` (agent.links' slots) its metrics and serve them at ``address``."""
    metrics = AgentMetrics(agents)
    return await serve_ops(*address, render=metrics.render, ready=metrics.ready, limits=limits,
                           max_connections=settings.max_metrics_connections)
