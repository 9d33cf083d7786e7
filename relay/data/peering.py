"""Relay-to-relay links: a worker connecting to a resource's endpoint on any relay reaches the
resource, whichever relays its agents are linked to (proxy peering, as Teleport's RFD 69).

- **The link.** Each relay of a PostgreSQL cluster listens for the others on its peer address
  (``--peer-listen``; recorded in ``relays.peer_address``): the project's session over TLS
  WebSocket, TLS 1.3 with a client certificate required on both sides: the relay-to-relay
  certificate the cluster CA issues to every relay (``peer.pem``, clientAuth, OU ``relay``;
  :mod:`relay.state.pki`). A connection whose certificate does not name the role ``relay`` is closed,
  on either side: a relay dialling another checks it before it says anything, so a server
  certificate of the same CA (which a TLS-terminating proxy in front of a relay holds) is never
  sent a stream. After the TLS handshake the dialling relay sends CONTROL ``{"type": "peer",
  "relay_id": …}`` and the other answers the same, the id the dialler read in the membership
  row (else the link is closed); the listener answers only a live relay of the membership
  table (read again when the id is new to it). Then either side opens streams. One link per pair of
  relays: the relay with the smaller id dials the others as they join; either dials on demand
  when it has a stream to forward and no link; when both links exist, the one dialled by the
  smaller id stays and the other is told to go away (its streams finish).
- **Forwarding.** A worker connection to resource R on a relay with no live agent of R: the
  relay reads which relays hold an agent link of R (``agent_links`` of relays heard from within
  the member TTL, relays not draining first, then newest epoch first: a stale row never wins
  over a newer link), opens a stream named R (its id, as the OPEN metadata) over the peer link
  to the first it can reach, and bridges the worker to it (:mod:`relay.data.forward`). The holding
  relay joins that stream to a new stream on its agent's link (fewest active streams, as for
  its own workers). While the database is away the last answer for R is used.
- **Backpressure.** End to end: worker TCP ↔ peer stream (the usual TCP bridge, credit only
  for bytes the kernel took) and peer stream ↔ agent stream (credit only once the other queue
  is below its high-water mark); each hop's windows bound what it holds.
- **A lost peer link.** When the link to a relay that is still a member closes, this relay
  dials it again at once; if that fails (the relay crashed, or another process now answers at
  its address) the relay is *unreachable* from here (``Cluster.unreachable``): its agent links
  are no longer counted (``resources list``) nor routed to, and the dial is retried every
  :data:`PEER_REDIAL_INTERVAL` until it answers (counted again) or its row expires after the
  member TTL (the backstop for partitions, where the other relays may still reach it).
"""

from __future__ import annotations

import asyncio
import logging
import re

from tunnel.bridge.dial import dial_tls_link
from tunnel.bridge.listen import serve_tls_links
from tunnel.bridge.tcp import LinkBuffers
from tunnel.carriers.base import Link, LinkHandler, LinkStream
from tunnel.core.limits import Limits
from tunnel.wire.constants import ErrorCode
from tunnel.wire.errors import LinkError, UsageError

from relay.state.pki import PEER_ROLE, peer_role
from relay.state.store.errors import StoreError, StoreUnavailable

from .forward import Splice
from .endpoints import open_metadata

log = logging.getLogger("relay.peering")

RELAY_ID = re.compile(r"rly_[a-z0-9]{1,64}")
#: Longest wait for a peer link to be dialled and greeted.
PEER_HANDSHAKE_TIMEOUT = 5.0
#: Seconds between dials of a relay whose peer link was lost and could not be dialled again.
PEER_REDIAL_INTERVAL = 1.0


class PeerLink:
    """One live, greeted link to another relay."""

    __slots__ = ("relay_id", "link", "dialed_by", "buffers", "features")

    def __init__(self, relay_id: str, link: Link, dialed_by: str, limits: Limits) -> None:
        self.relay_id = relay_id
        #: What the peer announced it understands (``features`` of its greeting).
        self.features: frozenset = frozenset()
        self.link = link
        self.dialed_by = dialed_by
        #: What the worker bridges of this link hold in user space (bounded by its window).
        self.buffers = LinkBuffers(limits.receive_bound)


class PeerLinkHandler(LinkHandler):
    """Greeting, then streams from the peer (to the agents here) and the link's end."""

    def __init__(self, peering: "Peering", link: Link, dialed: bool, expected: str | None = None) -> None:
        self.peering = peering
        self.link = link
        self.dialed = dialed
        #: Dialling side: the relay id of the membership row dialled.
        self.expected = expected
        self.peer: PeerLink | None = None
        self.greeted: asyncio.Future = asyncio.get_running_loop().create_future()
        #: Listening side: the membership check of the greeting, once it came.
        self.checking: asyncio.Task | None = None

    def control_received(self, message: dict) -> None:
        if message.get("type") != "peer" or self.peer is not None:
            return  # unknown types are ignored (forward compatibility)
        relay_id = message.get("relay_id")
        if not isinstance(relay_id, str) or not RELAY_ID.fullmatch(relay_id) or relay_id == self.peering.relay_id:
            self.link.close(ErrorCode.PROTOCOL_ERROR, "bad peer greeting")
            return
        if self.dialed and relay_id != self.expected:
            log.warning("peer link to relay %s closed: the relay there greets as %s", self.expected, relay_id)
            self.link.close(ErrorCode.UNAUTHORIZED, "not the relay dialled")
            return
        features = message.get("features")
        if self.dialed:
            self._greeted(relay_id, features)
        elif self.checking is None:
            self.checking = self.peering._spawn(self._check_member(relay_id, features))

    async def _check_member(self, relay_id: str, features) -> None:
        # Listening side: the greeting must name a live relay of the membership table.
        if not await self.peering.cluster.is_member(relay_id):
            log.warning("peer link from %s refused: %s is not a live relay of the cluster",
                        self.link.peer_address[:2], relay_id)
            self.link.close(ErrorCode.UNAUTHORIZED, "not a relay of the cluster")
            return
        if self.link.is_closing:
            return
        self.link.send_control(self.peering.greeting())
        self.link.handshake_done()
        self._greeted(relay_id, features)

    def _greeted(self, relay_id: str, features) -> None:
        self.peer = self.peering._add(relay_id, self.link, self.peering.relay_id if self.dialed else relay_id)
        if isinstance(features, list):
            self.peer.features = frozenset(f for f in features[:16] if f == "worker_address")
        if not self.greeted.done():
            self.greeted.set_result(self.peer)

    def stream_opened(self, stream: LinkStream):
        if self.peer is None:
            stream.reset(ErrorCode.REFUSED)
            return None
        return self.peering.stream_from_peer(stream)

    def link_closed(self, code: int, reason: str) -> None:
        if not self.greeted.done():
            self.greeted.set_exception(LinkError(f"peer link closed: {reason or code}"))
            self.greeted.exception()
        if self.peer is not None:
            self.peering._gone(self.peer)


class Peering:
    """This relay's links to the other relays of its cluster, and the streams over them."""

    def __init__(self, cluster, registry, limits: Limits, *, server_context, client_context) -> None:
        self.cluster = cluster
        self.registry = registry
        self.limits = limits
        self.server_context = server_context
        self.client_context = client_context
        #: relay id -> the link kept to it.
        self.links: dict[str, PeerLink] = {}
        self._dialing: dict[str, asyncio.Task] = {}
        self._redialing: dict[str, asyncio.Task] = {}
        self._holders: dict[str, list[dict]] = {}  # last answer per resource (database outages)
        self._tasks: set[asyncio.Task] = set()
        #: Splices of streams from peers to agents here, in flight.
        self.splices: set[Splice] = set()
        self.server: asyncio.Server | None = None
        self._accepted: set[Link] = set()
        self.closed = False

    @property
    def relay_id(self) -> str:
        return self.cluster.relay_id

    def greeting(self) -> dict:
        return {"type": "peer", "relay_id": self.relay_id, "features": ["worker_address"]}

    # ---- listening

    async def listen(self, host: str, port: int) -> int:
        """Accept peer links on ``host:port`` (0: a free port); return the port."""
        self.server = await serve_tls_links(host, port, ssl_context=self.server_context, limits=self.limits,
                                            on_link=self._on_link)
        return self.server.sockets[0].getsockname()[1]

    def _on_link(self, link: Link) -> None:
        if self.closed:
            link.close(ErrorCode.NO_ERROR, "relay stopping")
            return
        role = peer_role(link.peer_certificate)
        if role != PEER_ROLE:
            # The TLS layer already required a client certificate from the cluster CA valid
            # for client authentication; this also requires the relay role in it.
            log.warning("peer link from %s refused: its certificate names role %r, not %r",
                        link.peer_address[:2], role, PEER_ROLE)
            link.close(ErrorCode.UNAUTHORIZED, "not a relay certificate")
            return
        self._accepted.add(link)
        link.set_handler(PeerLinkHandler(self, link, dialed=False))

    # ---- links

    def _add(self, relay_id: str, link: Link, dialed_by: str) -> PeerLink:
        peer = PeerLink(relay_id, link, dialed_by, self.limits)
        current = self.links.get(relay_id)
        if current is not None and not current.link.is_closing and current.link is not link:
            # Two links to one relay: both sides keep the one the smaller id dialled.
            keep, drop = (current, peer) if current.dialed_by <= dialed_by else (peer, current)
            drop.link.goaway(ErrorCode.NO_ERROR, "duplicate peer link")
            self.links[relay_id] = keep
            return peer
        self.links[relay_id] = peer
        self._reachable(relay_id)
        log.info("peer link to relay %s up (%s)", relay_id, "dialled here" if dialed_by == self.relay_id
                 else "dialled by it")
        return peer

    def _gone(self, peer: PeerLink) -> None:
        self._accepted.discard(peer.link)
        if self.links.get(peer.relay_id) is peer:
            del self.links[peer.relay_id]
            log.info("peer link to relay %s closed", peer.relay_id)
            self._redial(peer.relay_id)

    def _member(self, relay_id: str) -> dict | None:
        for relay in self.cluster.members:
            if relay["id"] == relay_id:
                return relay
        return None

    def _reachable(self, relay_id: str) -> None:
        if relay_id in self.cluster.unreachable:
            self.cluster.unreachable.discard(relay_id)
            log.info("relay %s reachable again: its agent links count again", relay_id)

    def _redial(self, relay_id: str) -> None:
        """The link to ``relay_id`` was lost: dial it again now (see the module docstring)."""
        if self.closed or relay_id in self._redialing:
            return
        member = self._member(relay_id)
        if member is None or not member.get("peer_address") or member.get("draining"):
            return  # it left, or drains (its agents move away): nothing to recount
        task = self._redialing[relay_id] = asyncio.get_running_loop().create_task(self._redial_until_back(relay_id))
        task.add_done_callback(lambda _t: self._redialing.pop(relay_id, None))

    async def _redial_until_back(self, relay_id: str) -> None:
        while not self.closed:
            member = self._member(relay_id)
            if member is None or not member.get("peer_address"):
                self.cluster.unreachable.discard(relay_id)  # expired: its links are gone with it
                return
            if await self.link_to(relay_id, member["peer_address"]) is not None:
                return  # _add counted it again
            if relay_id not in self.cluster.unreachable:
                self.cluster.unreachable.add(relay_id)
                log.warning("relay %s unreachable since its peer link was lost: its agent links are not counted "
                            "here until it answers or its membership expires", relay_id)
            await asyncio.sleep(PEER_REDIAL_INTERVAL)

    def _live(self, relay_id: str) -> PeerLink | None:
        peer = self.links.get(relay_id)
        return peer if peer is not None and not peer.link.is_closing else None

    async def link_to(self, relay_id: str, address: str) -> PeerLink | None:
        """The link to ``relay_id`` (dialled at ``address`` if there is none); None when it
        cannot be reached now."""
        peer = self._live(relay_id)
        if peer is not None or self.closed:
            return peer
        task = self._dialing.get(relay_id)
        if task is None:
            task = self._dialing[relay_id] = asyncio.get_running_loop().create_task(self._dial(relay_id, address))
            task.add_done_callback(lambda _t: self._dialing.pop(relay_id, None))
        try:
            return await asyncio.shield(task)
        except Exception:  # noqa: BLE001 - logged by _dial
            return None

    async def _dial(self, relay_id: str, address: str) -> PeerLink | None:
        try:
            link = await dial_tls_link(address, ssl_context=self.client_context, limits=self.limits,
                                       timeout=PEER_HANDSHAKE_TIMEOUT)
        except (LinkError, OSError) as exc:
            self.registry.throttled.log(("peer dial", relay_id), logging.WARNING,
                                        "cannot reach relay %s at %s: %s", relay_id, address, exc)
            return None
        role = peer_role(link.peer_certificate)
        if role != PEER_ROLE:
            log.warning("peer link to relay %s at %s refused: its certificate names role %r, not %r",
                        relay_id, address, role, PEER_ROLE)
            link.close(ErrorCode.UNAUTHORIZED, "not a relay certificate")
            return None
        handler = PeerLinkHandler(self, link, dialed=True, expected=relay_id)
        link.set_handler(handler)
        link.send_control(self.greeting())
        try:
            peer = await asyncio.wait_for(asyncio.shield(handler.greeted), PEER_HANDSHAKE_TIMEOUT)
        except (LinkError, asyncio.TimeoutError) as exc:
            link.close(ErrorCode.TIMEOUT, "no peer greeting")
            log.warning("relay %s at %s did not greet: %s", relay_id, address, exc or "timed out")
            return None
        return self._live(relay_id)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def connect_members(self, relays: list[dict]) -> None:
        """Dial, in the background, the live relays with a larger id that have no link yet (the
        smaller id dials, so a pair gets one link); close links to relays that left."""
        if self.closed:
            return
        present = set()
        for relay in relays:
            relay_id = relay["id"]
            present.add(relay_id)
            if (relay_id > self.relay_id and relay.get("peer_address") and self._live(relay_id) is None
                    and relay_id not in self._dialing):
                self._spawn(self.link_to(relay_id, relay["peer_address"]))
        for relay_id, peer in list(self.links.items()):
            if relay_id not in present:
                peer.link.close(ErrorCode.NO_ERROR, "relay left the cluster")
        self.cluster.unreachable.intersection_update(present)

    # ---- forwarding (the relay the worker reached)

    async def holders(self, resource_id: str) -> list[dict]:
        """The relays holding an agent of ``resource_id`` (see :meth:`RelayState.holders`),
        but those unreachable from here."""
        try:
            rows = await self.cluster.state.holders(resource_id, self.cluster.settings.member_ttl)
            self._holders[resource_id] = rows
        except StoreUnavailable:
            rows = self._holders.get(resource_id, [])
        except Exception as exc:  # noqa: BLE001 - a database fault: the last answer serves
            self.registry.throttled.log(("holders", type(exc).__name__), logging.WARNING,
                                        "cannot read which relays hold agents (%s); using the last answer",
                                        exc if isinstance(exc, StoreError) else type(exc).__name__)
            rows = self._holders.get(resource_id, [])
        return [row for row in rows if row["relay_id"] not in self.cluster.unreachable]

    async def open_forward(self, resource_id: str, handler, worker: bytes = b"") -> tuple[LinkStream, LinkBuffers] | None:
        """A stream for ``resource_id`` to a relay holding one of its agents, with the link's
        buffer account; None when no such relay can be reached. ``worker``: the worker's
        address field (relay.data.endpoints.open_metadata), for peers that understand it."""
        for holder in await self.holders(resource_id):
            if holder["relay_id"] == self.relay_id or not holder["peer_address"]:
                continue
            peer = await self.link_to(holder["relay_id"], holder["peer_address"])
            if peer is None:
                continue
            try:
                metadata = resource_id.encode("ascii")
                if worker and "worker_address" in peer.features:
                    metadata += b"\0" + worker
                return peer.link.open_stream(metadata, handler), peer.buffers
            except UsageError:
                continue  # began closing meanwhile
        return None

    # ---- streams from peers (the relay holding the agent)

    def stream_from_peer(self, stream: LinkStream):
        resource_field, _, worker = bytes(stream.metadata).partition(b"\0")
        try:
            resource_id = resource_field.decode("ascii")
        except UnicodeDecodeError:
            resource_id = ""
        endpoint = self.registry.endpoints.get(resource_id)
        agent = None
        if endpoint is not None:
            # An agent that just stopped serving the resource still takes what the other
            # relays sent before they read its link's new record.
            agent = endpoint.pick_agent() or self.registry.leaving_agent(resource_id)
        if agent is None:
            stream.reset(ErrorCode.REFUSED)
            return None
        splice = Splice()
        try:
            handler = splice.connect(stream, agent.link, open_metadata(agent, endpoint.name, worker))
        except UsageError:
            stream.reset(ErrorCode.REFUSED)
            return None
        agent.active_streams += 1
        agent.flows[splice] = endpoint.resource_id
        self.splices.add(splice)

        def done() -> None:
            agent.active_streams -= 1
            agent.flow_done(splice)
            self.splices.discard(splice)

        splice.on_done = done
        return handler

    # ---- life

    def stop_listening(self) -> None:
        if self.server is not None:
            self.server.close()

    def close(self) -> None:
        self.closed = True
        for task in list(self._tasks) + list(self._dialing.values()) + list(self._redialing.values()):
            task.cancel()
        self.stop_listening()
        for peer in list(self.links.values()):
            peer.link.close(ErrorCode.NO_ERROR, "relay stopping")
        for link in list(self._accepted):
            link.close(ErrorCode.NO_ERROR, "relay stopping")
