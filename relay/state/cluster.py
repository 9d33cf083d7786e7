"""This relay as a member of the relays sharing one state database (one relay on SQLite, a
cluster on PostgreSQL): membership, agent links, revocation everywhere, and life without the
database.

- **Membership.** A new relay id at every start (``rly_…``: nothing in a copied state dir is
  an identity), a row in ``relays`` with the advertise URL, refreshed every
  ``heartbeat_interval``; rows silent for ``member_ttl`` are removed by whichever relay sees
  them first, with their agent links. A clean stop removes the row at once.
- **Agent links.** Each registered link is recorded (relay, agent instance, slot, epoch) in
  the same transaction that checks its resources' generations; closing it removes the row at
  its own epoch only. See docs/CLUSTER.md for why the epoch.
- **Revocation.** ``rotated`` and ``deleted`` events, from any relay, drop the affected
  agents here (through the registry), including agents whose registration is in flight.
  Events from other relays are hints (anyone who can connect to PostgreSQL can send one):
  on each, this relay re-reads the resources table and acts on what it says: agents below a
  resource's generation dropped, endpoints of resources gone closed, endpoints of new
  resources bound. A forged event changes nothing the tables do not already say.
  A ``resource_updated`` event has every relay read the resources' source rules
  (relay.state.access) again and apply the changed ones to its endpoints.
  An ``agents_revoked`` event (``agents revoke``), and ``rotated`` and ``deleted`` (which
  revoke the certificates scoped to that resource), have every relay read the revoked
  serials and instances again and drop the links they name, token or certificate.
- **Outages.** While the database is away the relay keeps its agents and streams; refusals
  are summed up in the log once per ``outage_log_interval``. When it returns, the relay
  re-joins, re-reads every resource's generation (revocations it missed) and rewrites its
  links.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import urllib.parse
from collections.abc import Awaitable, Callable

from tunnel import __version__
from tunnel.wire.errors import AuthError

from relay import format_host_port

from . import access
from .relay_state import LinkRefused, RelayState, new_id
from .store.errors import Conflict, StoreError, StoreUnavailable
from .store.settings import StoreSettings

log = logging.getLogger("relay.cluster")

ADVERTISE_SCHEMES = ("wss", "quic", "auto")
#: Expired agent certificate records are pruned at most once per this many seconds.
PRUNE_INTERVAL = 3600.0


def default_advertise_url(listen_host: str, port: int, server_names: list[str] | None = None) -> str:
    """``wss://HOST:PORT`` for the agent-facing ``--listen`` address; a wildcard host becomes
    the first ``--server-name``, else this machine's name."""
    host = listen_host
    if host in ("", "0.0.0.0", "::"):
        host = (server_names or [None])[0] or socket.getfqdn() or socket.gethostname()
    return "wss://" + format_host_port(host, port)


def check_advertise_url(url: str) -> str:
    """``url`` if it is ``wss://``, ``quic://`` or ``auto://`` with a host and a port."""
    parts = urllib.parse.urlsplit(url.strip())
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme not in ADVERTISE_SCHEMES or not parts.hostname or not port or parts.path not in ("", "/"):
        raise ValueError(f"bad advertise URL {url!r}: expected wss://host:port (or quic://, auto://)")
    return url.strip().rstrip("/")


class Coalesced:
    """An async job run on request; requests that arrive while it runs make it run once more
    after it (however many arrived). The job returns False to stop without that run."""

    def __init__(self, job: Callable[[], Awaitable[bool]]) -> None:
        self._job = job
        #: The run in progress or the last one (None before the first request).
        self.task: asyncio.Task | None = None
        self._again = False

    def request(self) -> None:
        if self.task is not None and not self.task.done():
            self._again = True
            return
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        self._again = True
        while self._again:
            self._again = False
            if not await self._job():
                return


class OutageLog:
    """Counts what the relay refused while the database was away and says so at most once
    per interval (never a line, let alone a traceback, per request)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._counts: dict[str, int] = {}
        self._last = float("-inf")
        self._since = 0.0

    def refused(self, what: str, exc: StoreUnavailable) -> None:
        now = time.monotonic()
        if not self._counts:
            self._since = now
        self._counts[what] = self._counts.get(what, 0) + 1
        if now - self._last >= self.interval:
            self.flush(exc.reason, now)

    def flush(self, reason: str = "", now: float | None = None) -> None:
        if not self._counts:
            return
        now = time.monotonic() if now is None else now
        summary = ", ".join(f"{n} {what}" for what, n in sorted(self._counts.items()))
        log.warning("state database unreachable%s: refused %s in the last %.0f s", f" ({reason})" if reason else "",
                    summary, max(0.0, now - self._since))
        self._counts.clear()
        self._last = now


class Cluster:
    """Membership, agent links and revocation of one relay (see the module docstring)."""

    def __init__(self, state: RelayState, registry, advertise_url: str,
                 settings: StoreSettings | None = None) -> None:
        self.state = state
        self.registry = registry
        self.settings = settings or StoreSettings()
        self.relay_id = new_id("rly")
        self.advertise_url = advertise_url
        self.outages = OutageLog(self.settings.outage_log_interval)
        #: Registrations between their link record and their entry in the registry, with
        #: the refusal a revocation arriving meanwhile left for them.
        self._pending: dict[object, tuple[str, str] | None] = {}
        self._tasks: set[asyncio.Task] = set()
        self._heartbeat_task: asyncio.Task | None = None
        self._resyncing = False
        #: Where the other relays reach this one (relay.data.peering), "" without peering.
        self.peer_address = ""
        #: True once this relay drains (relays.draining).
        self.draining = False
        #: The live relays as last read (``id``, ``advertise_url``, ``peer_address``, ``draining``).
        self.members: list[dict] = []
        #: Relays whose peer link was lost and cannot be dialled again (relay.data.peering): their
        #: agent links are neither counted nor routed to from here until they answer again.
        self.unreachable: set[str] = set()
        #: Called with :attr:`members` after each change heard (relays joining, leaving, draining).
        self.on_members = None
        #: Called with a resource's row when any relay creates one (every relay binds its endpoint).
        self.on_resource_created = None
        self._members_task: asyncio.Task | None = None
        #: Re-reading the resources after a hint (once more when a hint arrives meanwhile).
        self._reread = Coalesced(self._reread_resources_once)
        #: Resources whose endpoint a re-read already asked for (asked once each).
        self._bind_asked: set[str] = set()
        #: Set once stop() begins: leaving is not being taken for gone.
        self._stopping = False
        #: When the database came back after an outage (monotonic); see :meth:`_expire`.
        self._reconnected_at = float("-inf")
        #: Reading the revocations after a hint (once more when a hint arrives meanwhile).
        self._revocations = Coalesced(self._read_revocations_once)
        #: When expired certificate rows were last pruned (monotonic).
        self._pruned_at = float("-inf")

    # ---- life

    async def start(self) -> None:
        """Join (the database must be reachable), then follow events and heartbeat."""
        self.state.subscribe(self.on_event)
        await self._join()
        await self._expire()
        await self._refresh_members()
        self._heartbeat_task = asyncio.get_running_loop().create_task(self._heartbeat())
        log.info("relay %s joined the relays on %s, advertising %s", self.relay_id, self.state.description,
                 self.advertise_url)

    async def readvertise(self, advertise_url: str) -> None:
        """Change the URL this relay advertises (``--listen`` port 0, known once bound)."""
        self.advertise_url = advertise_url
        await self._join()

    async def set_peer_address(self, address: str) -> None:
        """Record where the other relays reach this one (its peer listener); forget this
        relay's previous run."""
        self.peer_address = address
        await self._join()
        await self._forget_previous_run()
        await self._refresh_members()

    async def _forget_previous_run(self) -> None:
        """Remove the row (and agent links) of this relay's previous run when it stopped without
        leaving (killed, crashed) and has not expired yet: the same advertise URL from the same
        peer host. Else this relay (and the others) would dial it and wait for it until it expires."""
        host = self.peer_address.rpartition(":")[0]
        for row in await self.state.list_relays():
            if (row["id"] != self.relay_id and row["advertise_url"] == self.advertise_url
                    and (row.get("peer_address") or "").rpartition(":")[0] == host):
                await self.state.leave_relay(row["id"])
                log.info("relay %s was this relay's previous run (the same %s): removed with its agent links",
                         row["id"], self.advertise_url)

    async def _join(self) -> None:
        await self.state.join_relay(self.relay_id, self.advertise_url, __version__, self.peer_address,
                                    self.draining)

    async def drain(self) -> None:
        """Tell every relay this one drains (best effort: the database may be away)."""
        self.draining = True
        try:
            await asyncio.wait_for(self.state.set_draining(self.relay_id), self.settings.db_query_timeout)
        except (StoreError, asyncio.TimeoutError) as exc:
            log.warning("could not record that relay %s drains: %s", self.relay_id, exc)

    async def stop(self) -> None:
        """Leave: remove this relay's row and its links (best effort within the query timeout)."""
        self._stopping = True
        tasks = [t for t in (self._heartbeat_task, self._members_task, self._reread.task, self._revocations.task,
                             *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.outages.flush()
        try:
            await asyncio.wait_for(self.state.leave_relay(self.relay_id), self.settings.db_query_timeout)
        except (StoreError, asyncio.TimeoutError) as exc:
            log.info("could not remove relay %s from the state database (%s); it expires in %.0f s",
                     self.relay_id, exc, self.settings.member_ttl)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval)
            try:
                if not await self.state.heartbeat(self.relay_id):
                    log.warning("relay %s was taken for gone by the other relays; joining again", self.relay_id)
                    await self.resync()
                await self._expire()
                await self._refresh_members()
                await self._prune()
            except StoreUnavailable:
                pass  # the database logs the outage once and reconnects; resync follows
            except StoreError as exc:
                log.warning("heartbeat failed: %s", exc)

    async def _expire(self) -> None:
        # No relay could heartbeat while the database was away: until every relay has had the
        # time to reconnect (at most db_reconnect_max) and a TTL more, a silent row says nothing
        # about its relay (else the first relay back would remove every other relay with its
        # agent links after any outage longer than the TTL).
        if time.monotonic() - self._reconnected_at < self.settings.member_ttl + self.settings.db_reconnect_max:
            return
        for relay_id in await self.state.expire_relays(self.settings.member_ttl):
            log.info("relay %s stopped heartbeating: removed with its agent links", relay_id)

    async def _prune(self) -> None:
        if time.monotonic() - self._pruned_at < PRUNE_INTERVAL:
            return
        self._pruned_at = time.monotonic()
        pruned = await self.state.prune_agent_certificates()
        if pruned:
            log.info("pruned %d expired agent certificate record(s)", pruned)

    # ---- events from every relay

    async def _refresh_members(self) -> None:
        rows = await self.state.list_relays()
        ttl = self.settings.member_ttl
        members = [{"id": r["id"], "advertise_url": r["advertise_url"], "peer_address": r.get("peer_address") or "",
                    "draining": bool(r["draining"])} for r in rows if float(r["heartbeat_age"]) <= ttl]
        changed = members != self.members
        before = {m["id"]: m for m in self.members}
        after = {m["id"]: m for m in members}
        for relay_id in after.keys() - before.keys() - {self.relay_id}:
            log.info("relay %s joined (%s)", relay_id, after[relay_id]["advertise_url"])
        for relay_id in before.keys() - after.keys() - {self.relay_id}:
            log.info("relay %s left", relay_id)
        self.members = members
        if self.relay_id in before and self.relay_id not in after and not self._stopping:
            log.warning("relay %s was taken for gone by the other relays; joining again", self.relay_id)
            self._spawn(self.resync())
        if changed and self.on_members is not None:
            self.on_members(members)

    async def is_member(self, relay_id: str) -> bool:
        """Whether ``relay_id`` is a live relay of the membership table (read again when it is
        not among the members last read: it may have just joined). False while the database
        cannot say."""
        if any(m["id"] == relay_id for m in self.members):
            return True
        try:
            await self._refresh_members()
        except StoreError:
            return False
        return any(m["id"] == relay_id for m in self.members)

    def _members_changed(self) -> None:
        if self._stopping:
            return
        if self._members_task is None or self._members_task.done():
            self._members_task = asyncio.get_running_loop().create_task(self._refresh_members_quietly())

    async def _refresh_members_quietly(self) -> None:
        try:
            await self._refresh_members()
        except StoreError:
            pass  # the next heartbeat reads them again

    def on_event(self, event: dict) -> None:
        kind = event.get("kind")
        if kind in ("relay_joined", "relay_left", "relay_draining"):
            self._members_changed()  # read from the relays table, whoever sent it
        if event.get("hint"):
            # From another relay, or anyone who can connect: the tables say what happened.
            if kind in ("resource_created", "rotated", "deleted"):
                self._reread.request()
            elif kind == "resource_updated":
                self._spawn(self._reread_rules())
            if kind in ("rotated", "deleted", "agents_revoked"):
                self._revocations.request()
            return
        if kind == "agents_revoked" or (kind in ("rotated", "deleted") and event.get("serials")):
            # The state has these revocations in memory already (it heard them first).
            self._drop_revoked()
        # Published by this process, in process: the change it made.
        if kind == "resource_created":
            resource = event.get("resource")
            if isinstance(resource, dict) and self.on_resource_created is not None:
                self.on_resource_created(resource)
        elif kind == "resource_updated":
            self._spawn(self._reread_rules())
        elif kind == "rotated":
            self._revoke(event.get("resource_id"), int(event.get("generation", 0)))
        elif kind == "deleted":
            self._delete(event.get("resource_id"))
        elif kind == "reconnected":
            self._reconnected_at = time.monotonic()
            self.outages.flush()
            self._spawn(self.resync())

    async def _read_revocations_once(self) -> bool:
        try:
            await self.state.read_revocations()
        except StoreUnavailable:
            return False  # the reconnection resyncs
        except StoreError as exc:
            log.warning("cannot re-read the revoked agents after an event: %s", exc)
            return False
        self._drop_revoked()
        return True

    def _revoked(self, session) -> bool:
        serial = session.cert_serial
        return (self.state.agent_instance_revoked(session.customer_id, session.instance)
                or (serial is not None and self.state.agent_certificate_revoked(serial)))

    def _drop_revoked(self) -> None:
        """Drop the links (and refuse the registrations in flight) of revoked agent instances
        and certificates, as the state now knows them."""
        for session in [s for s in self.registry.agents if self._revoked(s)]:
            log.info("agent %s (instance %s of customer %s): revoked; dropping its link", session.agent_id,
                     session.instance, session.customer_id)
            self.registry.drop_agent(session, "revoked", "agent instance or its certificate revoked")
        for session in self._pending:
            if self._revoked(session):
                self._pending[session] = ("revoked", "agent revoked")

    async def _reread_resources_once(self) -> bool:
        before = self._judged()
        try:
            generations = await self.state.resource_generations()
            self._apply_generations(generations, *before)
            for rid in generations.keys() - self.registry.endpoints.keys() - self._bind_asked:
                self._bind_asked.add(rid)
                row = await self.state.get_resource(rid)
                if row is not None and self.on_resource_created is not None:
                    self.on_resource_created(row)
        except StoreUnavailable:
            return False  # the reconnection resyncs
        except StoreError as exc:
            log.warning("cannot re-read the resources after an event: %s", exc)
            return False
        self._bind_asked &= generations.keys()
        return True

    def _judged(self) -> tuple[set[str], list]:
        """The endpoints and registrations in flight a read about to start can judge: their
        resources were committed before it, so one missing from it was deleted. (A resource
        created while the read runs is bound, or registered, after it: not judged by it.)"""
        return set(self.registry.endpoints), list(self._pending)

    def _apply_generations(self, generations: dict[str, int], endpoints: set[str], pending: list) -> None:
        """Drop what ``generations`` (every resource's, as read from the table) revokes:
        agents below their resource's generation, resources gone, and the registrations in
        flight that either concerns (of ``endpoints`` and ``pending``, see :meth:`_judged`)."""
        for resource_id in endpoints & set(self.registry.endpoints):
            if resource_id not in generations:
                self._delete(resource_id)
            elif generations[resource_id] > 0:  # no token is below generation 0
                dropped = self.registry.drop_agents(resource_id, below_generation=generations[resource_id])
                if dropped:
                    log.info("resource %s rotated to generation %d: dropped %d agent(s) here", resource_id,
                             generations[resource_id], dropped)
        for session in pending:
            if session not in self._pending:
                continue
            for resource_id in session.resources:
                if resource_id not in generations:
                    self._pending[session] = ("deleted", "resource deleted")
                elif session.generation < generations[resource_id]:
                    self._pending[session] = ("revoked", "registration token revoked")

    def _revoke(self, resource_id, generation: int) -> None:
        if not isinstance(resource_id, str):
            return
        dropped = self.registry.drop_agents(resource_id, below_generation=generation)
        for session in self._pending:
            if resource_id in session.resources and session.generation < generation:
                self._pending[session] = ("revoked", "registration token revoked")
        log.info("resource %s rotated to generation %d: dropped %d agent(s) here", resource_id, generation, dropped)

    def _delete(self, resource_id) -> None:
        if not isinstance(resource_id, str):
            return
        self.registry.resource_deleted(resource_id)
        for session in self._pending:
            if resource_id in session.resources:
                self._pending[session] = ("deleted", "resource deleted")
        log.info("resource %s deleted", resource_id)

    async def _reread_rules(self) -> None:
        """A resource's source rule changed on some relay: read the rules from the table (the
        event is only a hint) and apply the ones that differ here."""
        try:
            await self._apply_rules()
        except StoreError as exc:
            log.warning("cannot read the resources' allow lists (%s); the next resync applies them", exc)

    async def _apply_rules(self) -> None:
        for resource_id, allow_cidrs in (await self.state.resource_rules()).items():
            endpoint = self.registry.endpoints.get(resource_id)
            if endpoint is not None and access.format_cidrs(endpoint.allow) != allow_cidrs:
                self.registry.resource_updated(resource_id, allow_cidrs)

    # ---- agent links

    def _link_row(self, session) -> dict:
        host, port = session.link.peer_address[:2]
        return {
            "customer_id": session.customer_id,
            "agent_instance": session.instance,
            "slot": session.slot,
            "epoch": session.epoch,
            "relay_id": self.relay_id,
            "agent_id": session.agent_id,
            "transport": session.link.carrier,
            "address": format_host_port(str(host), int(port)),
            "version": session.version,
            "hostname": session.hostname,
            "connected_at": float(session.connected_since),
            "cert_serial": None if session.cert_serial is None else str(session.cert_serial),
        }

    async def admit(self, session, quota=None) -> None:
        """Record ``session``'s link; raise :class:`AuthError` if its token was revoked or a
        resource deleted meanwhile (here or on any relay), :class:`StoreUnavailable` if the
        database is away, what ``quota(count)`` raises given the customer's other live links
        in the cluster (:meth:`relay.state.RelayState.add_link`). On return the caller adds the
        session to the registry at once (before any other await)."""
        if self._revoked(session):
            raise AuthError(f"agent instance {session.instance} is revoked: a new instance enrols with a "
                            "registration token", code="revoked")
        self._pending[session] = None
        try:
            try:
                session.epoch = await self._add_link(session, quota)
            except Conflict:
                # This relay's row is gone (the others took it for dead): join again, once.
                await self._join()
                session.epoch = await self._add_link(session, quota)
            reread = self._reread.task
            if reread is not None and not reread.done():
                # A hint heard meanwhile: what it makes us read may refuse this registration.
                await asyncio.wait({reread}, timeout=self.settings.db_query_timeout)
        except LinkRefused as exc:
            if exc.code == "deleted":
                # Its endpoint may have been bound after the deletion was heard: close it.
                self.registry.resource_deleted(exc.resource_id)
            raise AuthError(str(exc), code=exc.code) from None
        finally:
            refusal = self._pending.pop(session, None)
        if refusal is not None:
            self.forget(session)
            raise AuthError(refusal[1], code=refusal[0])

    async def _add_link(self, session, quota=None) -> int:
        return await self.state.add_link(self._link_row(session), list(session.resources), session.generation,
                                         quota, self.settings.member_ttl)

    async def relink(self, session) -> None:
        """``session`` serves other resources now (CONTROL ``add_resources`` or
        ``remove_resources`` on its live link): record its link with them (at a new epoch), so
        that the other relays forward their workers here, or stop to. A failure is logged:
        the next resync writes the link again."""
        try:
            if session.resources:
                session.epoch = await self._add_link(session)
                if session.link.is_closing:  # closed meanwhile: its removal saw the old epoch
                    self.forget(session)
            elif session.epoch:
                await self.state.remove_link(session.customer_id, session.instance, session.slot, session.epoch)
        except LinkRefused as exc:
            # Revoked or deleted meanwhile: that event drops the resource from the agent.
            log.info("agent %s: link not recorded again: %s", session.agent_id, exc)
        except (Conflict, StoreError) as exc:
            self.registry.throttled.log(("relink", type(exc).__name__), logging.WARNING,
                                        "cannot record agent %s's resources in the state database: %s",
                                        session.agent_id, exc)

    def forget(self, session) -> None:
        """The link closed: remove its row (at its epoch) in the background."""
        if session.epoch:
            self._spawn(self._remove_link(session))

    async def _remove_link(self, session) -> None:
        try:
            await self.state.remove_link(session.customer_id, session.instance, session.slot, session.epoch)
        except StoreError:
            pass  # the database is away: the next resync (or this relay's expiry) removes it

    async def resync(self) -> None:
        """After an outage: join again, apply the revocations missed, rewrite our links."""
        if self._resyncing:
            return
        self._resyncing = True
        try:
            await self._join()
            before = self._judged()
            generations = await self.state.resource_generations()
            self._apply_generations(generations, *before)
            await self._apply_rules()
            await self.state.read_revocations()
            self._drop_revoked()
            live = {}
            for session in list(self.registry.agents):
                if session.epoch:
                    key = (session.customer_id, session.instance, session.slot)
                    if key not in live or live[key].epoch < session.epoch:
                        live[key] = session
            for row in await self.state.list_links(self.relay_id):
                key = (row["customer_id"], row["agent_instance"], row["slot"])
                if key not in live or live[key].epoch != row["epoch"]:
                    await self.state.remove_link(*key, row["epoch"])
            for session in live.values():
                await self.state.restore_link(self._link_row(session), list(session.resources))
            log.info("state resynchronised: %d resource(s), %d agent link(s) here", len(generations), len(live))
        except StoreUnavailable:
            pass  # gone again: the next reconnection resyncs
        except StoreError as exc:
            log.warning("resynchronising with the state database failed: %s", exc)
        finally:
            self._resyncing = False

    # ---- views for the admin API

    async def status(self) -> dict:
        relays = await self.state.list_relays()
        links = await self.state.list_links()
        return {
            "relay_id": self.relay_id,
            "advertise_url": self.advertise_url,
            "database": {"backend": self.state.backend, "url": self.state.description,
                         "available": self.state.available},
            "relays": [{
                "id": r["id"],
                "advertise_url": r["advertise_url"],
                "version": r["version"],
                "started_at": _iso(r["started_at"]),
                "heartbeat_age": round(max(0.0, float(r["heartbeat_age"])), 1),
                "links": int(r["links"]),
                "draining": bool(r["draining"]),
                "peer_address": r.get("peer_address") or "",
                "unreachable": r["id"] in self.unreachable,
                "self": r["id"] == self.relay_id,
            } for r in relays],
            "links": [link_view(link) for link in links],
        }


def link_view(link: dict) -> dict:
    """An ``agent_links`` row as the admin API shows it."""
    return {
        "agent_id": link["agent_id"],
        "agent_instance": link["agent_instance"],
        "slot": link["slot"],
        "epoch": link["epoch"],
        "relay_id": link["relay_id"],
        "relay_url": link["advertise_url"],
        "customer_id": link["customer_id"],
        "resources": link["resources"],
        "transport": link["transport"],
        "address": link["address"],
        "version": link["version"],
        "hostname": link["hostname"],
        "connected_since": _iso(link["connected_at"]),
        # How the link authenticated (as relay.data.endpoints.AgentSession.describe says it).
        "identity": "token" if link.get("cert_serial") is None else "certificate",
        "cert_serial": None if link.get("cert_serial") is None else format(int(link["cert_serial"]), "x"),
        "cert_expires_at": None if link.get("cert_not_after") is None else _iso(link["cert_not_after"]),
    }


def _iso(seconds) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(seconds)))
