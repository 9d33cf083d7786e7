"""The relay's metrics and health: ``/metrics``, ``/live`` and ``/ready`` at ``--metrics-listen``
(``RELAY_METRICS_LISTEN``; docs/METRICS.md lists every series).

Most of what is exported is read at scrape time from what the relay keeps anyway (the
registry's agents and endpoints, each link's round trip, each bridge's byte counts); events
nothing else remembers (streams opened, refused and failed, refused registrations, quota hits)
are plain integer counters bumped by one-line calls from :mod:`relay.control.server`,
:mod:`relay.data.registry` and :mod:`relay.data.endpoints`. Counters of a resource live as long as its endpoint.

Labels: ``customer`` and ``resource`` are the relay's own ids (``cus_…``, ``res_…``), never
names an agent sent; their number is bounded by the customers an operator created and by
``max_resources_per_customer`` each. Every other label takes a fixed set of words, except the
``name`` of the two info series (``tunnel_relay_resource_info``, ``tunnel_relay_customer_info``,
value 1), which carry the names to join on ids in queries (escaped by the exposition writer);
customer names are re-read from the state when a scrape comes ``NAMES_REFRESH`` seconds or more
after the last read (that scrape still shows the previous names; nobody scraping, no query).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import Counter
from weakref import WeakKeyDictionary

from tunnel import __version__
from tunnel.bridge.listen import handshake_failures
from tunnel.core.limits import Limits
from tunnel.ops.exposition import Family, Histogram, process_families, render
from tunnel.ops.metrics_http import serve_ops
from tunnel.wire.constants import ErrorCode

from relay.settings import DEFAULT_RELAY_SETTINGS, RelaySettings

log = logging.getLogger("relay.metrics")

#: Upper bounds (seconds) of the link round trip histogram's buckets.
RTT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
TRANSPORTS = ("wss", "quic")
#: The ``code`` of the CONTROL ``error`` the relay answers a refused ``auth`` with.
AUTH_CODES = frozenset({"unauthorized", "bad_request", "revoked", "deleted", "quota_exceeded", "relay_full",
                        "unavailable", "internal"})
#: How stale the customers' names (for ``tunnel_relay_customer_info``) may get before a scrape
#: has them read again (s).
NAMES_REFRESH = 2.0
#: Why a connection to an endpoint was reset at once.
REFUSALS = ("no_agent", "deregistered", "link_closing", "quota", "not_allowed")


def reset_reason(code: int) -> str:
    """The ``reason`` label of a stream reset with ``code``: its ErrorCode name in lower case
    (a peer may send any number: those are ``other``)."""
    return ErrorCode(code).name.lower() if ErrorCode.known(code) else "other"


class _Streams:
    """The stream counters of one resource."""

    __slots__ = ("opened", "refused", "failed", "to_resource", "from_resource")

    def __init__(self) -> None:
        self.opened = 0
        self.refused: Counter = Counter()
        self.failed: Counter = Counter()
        #: Bytes of finished streams (live ones are read from their bridges).
        self.to_resource = 0
        self.from_resource = 0


class RelayMetrics:
    """What the relay counts, and the metric families it exports (:meth:`render`)."""

    def __init__(self) -> None:
        self._streams: WeakKeyDictionary = WeakKeyDictionary()  # Endpoint -> _Streams
        self.auth_failures: Counter = Counter()  # code -> refused registrations
        self.early_messages: Counter = Counter()  # transport -> links that spoke before auth
        self.quota_hits: Counter = Counter()  # (customer, limit) -> n
        self.rtt = {transport: Histogram(RTT_BUCKETS) for transport in TRANSPORTS}
        self._rtt_seen: dict = {}  # AgentSession -> the last round trip sampled
        #: Customer id -> name, as last read from the state (MetricsService refreshes it).
        self.customer_names: dict[str, str] = {}

    # --- events (one call each from the relay) ------------------------------------------

    def _of(self, endpoint) -> _Streams:
        streams = self._streams.get(endpoint)
        if streams is None:
            streams = self._streams[endpoint] = _Streams()
        return streams

    def stream_opened(self, endpoint) -> None:
        self._of(endpoint).opened += 1

    def stream_refused(self, endpoint, reason: str, quota=None) -> None:
        """A connection to ``endpoint`` reset at once (``reason`` one of :data:`REFUSALS`);
        ``quota``: the :class:`relay.data.quotas.QuotaExceeded` behind it."""
        self._of(endpoint).refused[reason] += 1
        if quota is not None:
            self.quota_hits[quota.customer_id or "", quota.limit] += 1

    def stream_done(self, endpoint, bridge) -> None:
        """A stream of ``endpoint`` finished: keep its bytes; count it failed if it was reset
        with an error."""
        streams = self._of(endpoint)
        streams.to_resource += bridge.bytes_from_tcp
        streams.from_resource += bridge.bytes_to_tcp
        code = bridge.reset_code
        if code is not None and code != ErrorCode.NO_ERROR:
            streams.failed[reset_reason(code)] += 1

    def auth_refused(self, code: str, quota=None) -> None:
        """A registration (or a check) refused with CONTROL ``error`` ``code``; ``quota``: the
        :class:`relay.data.quotas.QuotaExceeded` behind it."""
        self.auth_failures[code if code in AUTH_CODES else "other"] += 1
        if quota is not None:
            self.quota_hits[quota.customer_id or "", quota.limit] += 1

    def spoke_before_auth(self, transport: str) -> None:
        """A link sent something other than one ``auth`` first and was closed."""
        self.early_messages[transport] += 1

    def sample_rtt(self, agents) -> None:
        """Put the keepalive round trip each link measured since the last sample into the
        histogram (a link's value changes with each PING answered)."""
        seen = {}
        last = self._rtt_seen
        for agent in agents:
            rtt = agent.link.rtt
            if rtt is None:
                continue
            seen[agent] = rtt
            if last.get(agent) != rtt:
                histogram = self.rtt.get(agent.link.carrier)
                if histogram is None:
                    histogram = self.rtt[agent.link.carrier] = Histogram(RTT_BUCKETS)
                histogram.observe(rtt)
        self._rtt_seen = seen

    # --- exposition ---------------------------------------------------------------------

    def families(self, registry) -> list[Family]:
        """Every family, from the counters above and the live ``registry``."""
        agents = Family("tunnel_relay_agents_connected", "gauge",
                        "Registered agent links, per customer and transport.", ("customer", "transport"))
        resources = Family("tunnel_relay_resources", "gauge",
                           "Resources with an endpoint on this relay, per customer.", ("customer",))
        available = Family("tunnel_relay_resources_available", "gauge",
                           "Resources at least one agent serves, per customer.", ("customer",))
        resource_agents = Family("tunnel_relay_resource_agents", "gauge",
                                 "Agents serving each resource.", ("customer", "resource"))
        unreachable = Family("tunnel_relay_resource_agents_target_unreachable", "gauge",
                             "Agents of each resource that report they cannot reach its private service "
                             "(CONTROL target_health).", ("customer", "resource"))
        opened = Family("tunnel_relay_streams_opened_total", "counter",
                        "Connections to a resource endpoint that became a stream to an agent.",
                        ("customer", "resource"))
        active = Family("tunnel_relay_streams_active", "gauge", "Streams open now, per resource.",
                        ("customer", "resource"))
        refused = Family("tunnel_relay_streams_refused_total", "counter",
                         "Connections to a resource endpoint reset at once, by reason.",
                         ("customer", "resource", "reason"))
        failed = Family("tunnel_relay_streams_failed_total", "counter",
                        "Streams that ended with a reset, by its error code.", ("customer", "resource", "reason"))
        moved = Family("tunnel_relay_stream_bytes_total", "counter",
                       "Bytes through each resource's streams: to_resource (from workers) and from_resource.",
                       ("customer", "resource", "direction"))

        resource_info = Family("tunnel_relay_resource_info", "gauge",
                               "Each resource with an endpoint here, with its name (value 1): join on resource.",
                               ("resource", "name", "customer"))
        customer_info = Family("tunnel_relay_customer_info", "gauge",
                               "Each customer, with its name (value 1): join on customer.", ("customer", "name"))
        for customer, name in sorted(self.customer_names.items()):
            customer_info.add((customer, name), 1)

        by_customer: Counter = Counter()
        customers = set()
        for agent in registry.agents:
            if not agent.link.is_closing:
                by_customer[agent.customer_id, agent.link.carrier] += 1
            customers.add(agent.customer_id)
        totals: Counter = Counter()
        up: Counter = Counter()
        for rid, endpoint in registry.endpoints.items():
            customer = endpoint.customer_id
            customers.add(customer)
            totals[customer] += 1
            live = sum(1 for a in endpoint.agents if not a.link.is_closing)
            up[customer] += live > 0
            labels = (customer, rid)
            resource_info.add((rid, endpoint.name, customer), 1)
            resource_agents.add(labels, live)
            unreachable.add(labels, sum(1 for a in endpoint.agents if not a.link.is_closing and a.target_down(rid)))
            streams = self._streams.get(endpoint) or _Streams()
            opened.add(labels, streams.opened)
            active.add(labels, len(endpoint.bridges))
            for reason in REFUSALS:
                refused.add((*labels, reason), streams.refused[reason])
            for reason, n in sorted(streams.failed.items()):
                failed.add((*labels, reason), n)
            to_resource, from_resource = streams.to_resource, streams.from_resource
            for bridge in endpoint.bridges:
                to_resource += bridge.bytes_from_tcp
                from_resource += bridge.bytes_to_tcp
            moved.add((*labels, "to_resource"), to_resource)
            moved.add((*labels, "from_resource"), from_resource)
        transports = sorted(set(TRANSPORTS) | {t for _, t in by_customer})
        for customer in sorted(customers):
            for transport in transports:
                agents.add((customer, transport), by_customer[customer, transport])
            resources.add((customer,), totals[customer])
            available.add((customer,), up[customer])

        handshakes = Family("tunnel_relay_handshake_failures_total", "counter",
                            "Agent connections given up before authentication, by transport and reason.",
                            ("transport", "reason"))
        failures = Counter(handshake_failures())
        for transport, n in self.early_messages.items():
            failures[transport, "protocol"] += n
        for (transport, reason), n in sorted(failures.items()):
            handshakes.add((transport, reason), n)
        auth = Family("tunnel_relay_auth_failures_total", "counter",
                      "Registrations (and agent checks) refused, by the error code sent to the agent.", ("reason",))
        for code, n in sorted(self.auth_failures.items()):
            auth.add((code,), n)
        quotas = Family("tunnel_relay_quota_hits_total", "counter",
                        "Refusals because a customer (or the relay) was over a quota, by the limit hit.",
                        ("customer", "limit"))
        for (customer, limit), n in sorted(self.quota_hits.items()):
            quotas.add((customer, limit), n)
        rtt = Family("tunnel_relay_link_rtt_seconds", "histogram",
                     "Round trips of agent links measured by PINGs (keepalive, and while data flows).",
                     ("transport",))
        for transport, histogram in sorted(self.rtt.items()):
            rtt.add_histogram((transport,), histogram)
        info = Family("tunnel_relay_build_info", "gauge", "The relay's version.", ("version",)).add((__version__,), 1)
        return [agents, resources, available, resource_agents, unreachable, opened, active, refused, failed, moved, handshakes,
                auth, quotas, rtt, info, resource_info, customer_info, *process_families()]

    def render(self, registry) -> bytes:
        return render(self.families(registry))


async def ready(relay) -> str | None:
    """None when the relay is ready: it accepts agents and its state answers
    (``state.ping()``, plain or a coroutine); else why not."""
    if not relay.accepting:
        return "not accepting agents"
    try:
        answer = relay.state.ping()
        if inspect.isawaitable(answer):
            await answer
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
        relay.throttled.log("ready", logging.WARNING, "readiness check: the relay state does not answer: %s", exc)
        # Words for the operator, not the exception's class or text (paths, addresses): the log has those.
        return "state database unreachable (the relay's log says why)"
    return None


class MetricsService:
    """The ``/metrics``, ``/live`` and ``/ready`` server of a relay, and the sampler that feeds
    the round-trip histogram every ``keepalive_interval``."""

    def __init__(self, relay, limits: Limits, settings: RelaySettings = DEFAULT_RELAY_SETTINGS) -> None:
        self.relay = relay
        self.limits = limits
        self.settings = settings
        self.server = None
        self._sampler: asyncio.Task | None = None
        self._names: asyncio.Task | None = None  # reading the customers' names
        self._names_read = float("-inf")

    async def start(self, host: str, port: int) -> "MetricsService":
        relay = self.relay
        self.server = await serve_ops(host, port, render=self._render, ready=lambda: ready(relay),
                                      limits=self.limits, max_connections=self.settings.max_metrics_connections)
        self._sampler = asyncio.get_running_loop().create_task(self._sample_forever())
        self._read_names()
        return self

    def _render(self) -> bytes:
        if self._names is None and time.monotonic() - self._names_read >= NAMES_REFRESH:
            self._read_names()
        return self.relay.metrics.render(self.relay.registry)

    @property
    def port(self) -> int:
        return self.server.port

    async def _sample_forever(self) -> None:
        relay = self.relay
        while True:
            started = time.monotonic()
            relay.metrics.sample_rtt(relay.registry.agents)
            await asyncio.sleep(max(self.limits.keepalive_interval - (time.monotonic() - started), 0.1))

    def _read_names(self) -> None:
        self._names_read = time.monotonic()
        self._names = asyncio.get_running_loop().create_task(self._names_now())

    async def _names_now(self) -> None:
        """Read the customers' names (every relay of a cluster reads the same table)."""
        relay = self.relay
        try:
            customers = await relay.state.list_customers()
            relay.metrics.customer_names = {c["id"]: c["name"] for c in customers}
        except Exception as exc:  # noqa: BLE001 - the last names serve until the state answers
            relay.throttled.log("metrics-names", logging.DEBUG, "customer names not read: %s", exc)
        finally:
            self._names = None

    def close(self) -> None:
        if self._names is not None:
            self._names.cancel()
        if self._sampler is not None:
            self._sampler.cancel()
        if self.server is not None:
            self.server.close()
