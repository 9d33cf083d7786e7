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

from tunnel import __version__
from tunnel.wire.errors import AuthError

from . import format_host_port
from .state import LinkRefused, RelayState, new_id
from .store.errors import Conflict, StoreError, StoreUnavailable
from .store.settings import StoreSettings

log = logging.getLogger("relay.cluster")

ADVERTISE_SCHEMES = ("wss", "quic", "auto")


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
        #: Where the other relays reach this one (relay.peering), "" without peering.
        self.peer_address = ""
        #: True once this relay drains (relays.draining).
        self.draining = False
        #: The live relays as last read (``id``, ``advertise_url``, ``peer_address``, ``draining``).
        self.members: list[dict] = []
        #: Relays whose peer link was lost and cannot be dialled again (relay.peering): their
        #: agent links are neither counted nor routed to from here until they answer again.
        self.unreachable: set[str] = set()
        #: Called with :attr:`members` after each change heard (relays joining, leaving, draining).
        self.on_members = None
        #: Called with a resource's row when any relay creates one (every relay binds its endpoint).
        self.on_resource_created = None
        self._members_task: asyncio.Task | None = None
        #: When the database came back after an outage (monotonic); see :meth:`_expire`.
        self._reconnected_at = float("-inf")

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
        """Record where the other relays reach this one (its peer listener)."""
        self.peer_address = address
        await self._join()

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
        tasks = [t for t in (self._heartbeat_task, self._members_task, *self._tasks) if t is not None]
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

    # ---- events from every relay

    async def _refresh_members(self) -> None:
        rows = await self.state.list_relays()
        ttl = self.settings.member_ttl
        members = [{"id": r["id"], "advertise_url": r["advertise_url"], "peer_address": r.get("peer_address") or "",
                    "draining": bool(r["draining"])} for r in rows if float(r["heartbeat_age"]) <= ttl]
        changed = members != self.members
        self.members = members
        if changed and self.on_members is not None:
            self.on_members(members)

    def _members_changed(self) -> None:
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
            self._members_changed()
        if kind == "resource_created":
            resource = event.get("resource")
            if isinstance(resource, dict) and self.on_resource_created is not None:
                self.on_resource_created(resource)
        elif kind == "rotated":
            self._revoke(event.get("resource_id"), int(event.get("generation", 0)))
        elif kind == "deleted":
            self._delete(event.get("resource_id"))
        elif kind == "relay_joined" and event.get("relay_id") != self.relay_id:
            log.info("relay %s joined (%s)", event.get("relay_id"), event.get("advertise_url"))
        elif kind == "relay_left" and event.get("relay_id") != self.relay_id:
            log.info("relay %s left%s", event.get("relay_id"), " (expired)" if event.get("expired") else "")
        elif kind == "relay_left" and event.get("expired"):
            log.warning("relay %s was taken for gone by the other relays; joining again", self.relay_id)
            self._spawn(self.resync())
        elif kind == "reconnected":
            self._reconnected_at = time.monotonic()
            self.outages.flush()
            self._spawn(self.resync())

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
        }

    async def admit(self, session) -> None:
        """Record ``session``'s link; raise :class:`AuthError` if its token was revoked or a
        resource deleted meanwhile (here or on any relay), :class:`StoreUnavailable` if the
        database is away. On return the caller adds the session to the registry at once
        (before any other await)."""
        self._pending[session] = None
        try:
            try:
                session.epoch = await self._add_link(session)
            except Conflict:
                # This relay's row is gone (the others took it for dead): join again, once.
                await self._join()
                session.epoch = await self._add_link(session)
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

    async def _add_link(self, session) -> int:
        return await self.state.add_link(self._link_row(session), list(session.resources), session.generation)

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
            generations = await self.state.resource_generations()
            for resource_id in list(self.registry.endpoints):
                if resource_id not in generations:
                    self._delete(resource_id)
                else:
                    dropped = self.registry.drop_agents(resource_id, below_generation=generations[resource_id])
                    if dropped:
                        log.info("resource %s was rotated while the database was away: dropped %d agent(s)",
                                 resource_id, dropped)
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
    }


def _iso(seconds) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(seconds)))
