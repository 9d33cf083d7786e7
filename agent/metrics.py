"""The agent's metrics and health: ``/metrics``, ``/live`` and ``/ready`` at ``METRICS_LISTEN``
(off by default; docs/METRICS.md lists every series). Imported only when it is set: an agent
without it loads nothing of this.

The runner reports what happens with one call each (connecting, registered, waiting to
reconnect, a stream dialling its target); the rest (round trip, bytes, open streams) is read
from the links at scrape time. Labels: ``relay`` is the ``host:port`` of ``RELAY_URL``,
``resource`` and ``target`` come from the agent's own configuration, ``reason`` is a fixed
word; nothing the relay sends becomes a label.
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


class AgentMetrics:
    """What the agent counts and exports; ``agent`` is the :class:`agent.runner.Agent`."""

    def __init__(self, agent) -> None:
        self.agent = agent
        dialer = agent.dialer
        host = f"[{dialer.host}]" if ":" in dialer.host else dialer.host
        #: The ``relay`` label: where RELAY_URL points (no scheme, path or user info).
        self.relay = f"{host}:{dialer.port}"
        self.state = "connecting"
        self.reconnects = 0
        self.opened: Counter = Counter()  # resource -> streams
        self.dial_failures: Counter = Counter()  # (resource, target, reason) -> n
        #: Registered links not closed yet, and the bytes of those that closed.
        self.links: set[Link] = set()
        self.bytes_sent = 0
        self.bytes_received = 0
        self._tasks: set[asyncio.Task] = set()

    # --- events (one call each from the runner) -----------------------------------------

    def connecting(self) -> None:
        self.state = "connecting"

    def registered(self, link: Link) -> None:
        self.state = "registered"
        if link not in self.links:
            self.links.add(link)
            task = asyncio.get_running_loop().create_task(self._keep_bytes(link))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def waiting(self) -> None:
        """The link is down (or was refused); the agent reconnects after its backoff."""
        self.state = "waiting"
        self.reconnects += 1

    def stream_dialing(self, name: str, task: asyncio.Task) -> None:
        """A stream for resource ``name`` arrived; ``task`` dials its target
        (:func:`tunnel.bridge.tcp.dial_bridge`, whose result says why it failed)."""
        self.opened[name] += 1
        target = self.agent.config.target(name)
        where = f"{target.host}:{target.port}" if target is not None else ""
        task.add_done_callback(partial(self._dialed, name, where))

    def _dialed(self, name: str, where: str, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        exc = task.exception() or task.result()
        if exc is not None:
            self.dial_failures[name, where, dial_reason(exc)] += 1

    async def _keep_bytes(self, link: Link) -> None:
        """Once ``link`` is over, move its byte counts to the totals."""
        try:
            await link.wait_closed()
        finally:
            self.links.discard(link)
            self.bytes_sent += link.bytes_sent
            self.bytes_received += link.bytes_received

    # --- exposition ---------------------------------------------------------------------

    def _live(self) -> list[Link]:
        return [link for link in self.links if not link.is_closing]

    def ready(self) -> str | None:
        """None once registered with a live link; else why not."""
        if self.state == "registered" and self._live():
            return None
        return f"not registered with the relay ({self.state})"

    def families(self) -> list[Family]:
        relay = self.relay
        live = self._live()
        current = self.agent.link
        state = Family("tunnel_agent_link_state", "gauge",
                       "The agent's link to the relay: 1 for its current state.", ("relay", "state"))
        for name in STATES:
            state.add((relay, name), int(name == self.state))
        transport = Family("tunnel_agent_link_transport", "gauge",
                           "1 for the transport the registered link rides.", ("relay", "transport"))
        riding = current.carrier if current is not None and current in live else None
        for name in sorted({*TRANSPORTS, *([riding] if riding else [])}):
            transport.add((relay, name), int(name == riding))
        reconnects = Family("tunnel_agent_reconnects_total", "counter",
                            "Times the agent lost (or could not get) its link and dialled the relay again.",
                            ("relay",)).add((relay,), self.reconnects)
        rtt = Family("tunnel_agent_link_rtt_seconds", "gauge",
                     "The last round trip a keepalive PING measured on the current link.", ("relay",))
        if riding and current.rtt is not None:
            rtt.add((relay,), current.rtt)
        active = Family("tunnel_agent_streams_active", "gauge", "Streams open now.", ("relay",)) \
            .add((relay,), sum(link.stream_count for link in live))
        sent, received = self.bytes_sent, self.bytes_received
        for link in self.links:
            sent += link.bytes_sent
            received += link.bytes_received
        moved = Family("tunnel_agent_link_bytes_total", "counter",
                       "Stream payload bytes over the agent's links, sent to and received from the relay.",
                       ("relay", "direction"))
        moved.add((relay, "sent"), sent).add((relay, "received"), received)
        opened = Family("tunnel_agent_streams_opened_total", "counter",
                        "Streams the relay opened, per resource.", ("resource",))
        failures = Family("tunnel_agent_dial_failures_total", "counter",
                          "Dials to a private service that failed, per resource, target and reason.",
                          ("resource", "target", "reason"))
        failed = Counter(self.dial_failures)
        for target in self.agent.config.targets:
            opened.add((target.name,), self.opened[target.name])
            for reason in DIAL_REASONS:
                failed[target.name, f"{target.host}:{target.port}", reason] += 0
        for labels, n in sorted(failed.items()):
            failures.add(labels, n)
        reachable = Family("tunnel_agent_target_reachable", "gauge",
                           "1 while the resource's private service answers, 0 while it does not (agent.health: "
                           "the last dial or check); absent before the first.", ("resource",))
        health = getattr(self.agent, "health", None)
        for target in self.agent.config.targets:
            known = health.states.get(target.name) if health is not None else None
            if known is not None and known.reachable is not None:
                reachable.add((target.name,), int(known.reachable))
        info = Family("tunnel_agent_build_info", "gauge", "The agent's version.", ("version",)).add((__version__,), 1)
        return [state, transport, reconnects, rtt, active, moved, opened, failures, reachable, info,
                *process_families()]

    def render(self) -> bytes:
        return render(self.families())


async def serve_metrics(agent, address: tuple[str, int], limits: Limits, settings: AgentSettings) -> OpsServer:
    """Give ``agent`` its :class:`AgentMetrics` and serve them at ``address``."""
    metrics = agent.metrics = AgentMetrics(agent)
    return await serve_ops(*address, render=metrics.render, ready=metrics.ready, limits=limits,
                           max_connections=settings.max_metrics_connections)
