"""The relay's durable state, through one async interface (:class:`RelayState`) over either
back end of :mod:`relay.state.store`: SQLite in ``<state-dir>/relay.db`` (the default) or PostgreSQL
(``--database postgresql://…``, shared by every relay of a cluster). Schema: see
:mod:`relay.state.store.migrations`.

- ``customers``  ``id`` (``cus_`` + 16 base32 chars), ``name``, ``created_at``, ``name_key``
  (:func:`name_key`, unique: one customer per name, whatever the case, width or look-alike
  letters)
- ``resources``  ``id`` (``res_…``), ``customer_id``, ``name``, ``port``, ``generation``,
  ``created_at``, ``allow_cidrs`` (who may reach its endpoint, :mod:`relay.state.access`; NULL: the
  relay default); one name per customer, one port per resource (kept across restarts)
- ``tokens``     every registration JWT issued (audit): ``jti``, ``customer_id``,
  ``resource_id``, ``generation``, ``org_only``, ``issued_at``, ``expires_at``
- ``relays``     the relays of the cluster, each kept alive by its heartbeat
- ``agent_links`` (+ ``agent_link_resources``) which relay holds which agent link, with an epoch
  and ``cert_serial`` (the certificate it authenticated with; NULL: a registration token)
- ``agent_certificates`` every client certificate the CA issued at an enrolment: ``serial``
  (decimal text), ``customer_id``, ``instance``, ``resource_ids`` (comma-separated; NULL: the
  customer's every resource), ``issued_at``, ``not_after``, ``revoked_at``, ``revoked_reason``;
  rows expired for :data:`CERTIFICATE_RETENTION` are pruned
- ``revoked_agents`` agent instances revoked as a whole (``agents revoke``): ``customer_id``,
  ``instance``, ``revoked_at``, ``reason``; no link of theirs is admitted (token or certificate)
  and no certificate issued, for :data:`REVOKED_AGENT_RETENTION`

``resources.last_served_at`` (Unix seconds an agent last served the resource, NULL when
never: then ``created_at`` counts) drives the expiry of resources no agent serves.

The built-in organisation customer ``cus_org`` (name ``organization``) is created on first use
and owns the resources registered with ``--org-only`` tokens.

Rotating a resource and deleting it publish events (``rotated``, ``deleted``) that every relay
on the database receives (see :mod:`relay.state.cluster`); so do relays joining and leaving,
and revoking an agent instance (``agents_revoked``). Both also revoke the certificates whose
scope names that resource (a customer-wide one stays: the agent keeps its other resources).
The revoked serials and instances are kept in memory too (:meth:`RelayState.agent_certificate_revoked`,
:meth:`RelayState.agent_instance_revoked`), read at open and again on every hint.

Also, from below it, the small file helpers every relay module uses: :func:`ensure_state_dir`
(mode 0700) and :func:`write_private` (atomic, mode 0600) from :mod:`relay.state.files`, and
:func:`state_write_failure`, which tells a full or read-only state directory apart from a bug.
"""

from __future__ import annotations

import base64
import datetime as _dt
import os
import random
import secrets
import socket
import unicodedata
from collections.abc import Callable, Iterable
from pathlib import Path

from .files import ensure_state_dir, write_private
from .store.connect import open_database
from .store.database import Database, Subscriber
from .store.errors import Conflict, StateWriteFailed, StoreUnavailable, state_write_failure
from .store.migrations import SCHEMA_VERSION, migrate
from .store.settings import StoreSettings

ORG_CUSTOMER_ID = "cus_org"
ORG_CUSTOMER_NAME = "organization"
DEFAULT_PORT_RANGE = (20000, 29999)
MAX_NAME_LENGTH = 200
#: Certificate rows are pruned this long (s) after they expired.
CERTIFICATE_RETENTION = 7 * 24 * 3600
#: An instance revoked as a whole stays refused this long (s): longer than any certificate
#: (relay.state.enrolment.MAX_TTL) issued to it before could live.
REVOKED_AGENT_RETENTION = 31 * 24 * 3600
#: Revoked serials are remembered until their certificate expired this long ago (s): a peer's
#: clock may lag behind.
EXPIRY_SKEW = 3600.0

# --------------------------------------------------------------------------- ids, names


def new_id(prefix: str) -> str:
    """``prefix`` + ``_`` + 16 lower-case base32 characters (80 random bits)."""
    return prefix + "_" + base64.b32encode(secrets.token_bytes(10)).decode("ascii").lower()


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def validate_name(name: object, what: str = "name") -> str:
    """A display name: a non-empty string of at most 200 printable characters."""
    if not isinstance(name, str):
        raise ValueError(f"{what} must be a string")
    if not name or not name.strip():
        raise ValueError(f"{what} must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"{what} must be at most {MAX_NAME_LENGTH} characters")
    if not name.isprintable():
        raise ValueError(f"{what} must not contain control characters")
    return name


#: Letters of other scripts that look like a Latin letter in common fonts, mapped to it: the
#: lower-case Cyrillic, Greek and Latin rows of Unicode's confusables list (UTS #39) whose
#: skeleton is one Latin letter, those keyboards and homograph attacks use. Not the whole list
#: (tens of thousands of rows, most of them sequences, symbols and other scripts): enough that a
#: customer name cannot be spelt again with these look-alikes; names in other scripts stay
#: distinct, as do accented letters (``é`` is not ``e``).
CONFUSABLES = str.maketrans({
    # Cyrillic
    "а": "a", "с": "c", "ԁ": "d", "е": "e", "һ": "h", "і": "i", "ј": "j", "ӏ": "l", "о": "o", "р": "p",
    "ԛ": "q", "ѕ": "s", "ѵ": "v", "ԝ": "w", "х": "x", "у": "y", "ү": "y",
    # Greek
    "α": "a", "ϲ": "c", "ι": "i", "ϳ": "j", "ν": "v", "ο": "o", "ρ": "p", "γ": "y",
    # Latin
    "ı": "i", "ɑ": "a", "ɡ": "g", "ǀ": "l", "ſ": "f",
})


def name_key(name: str) -> str:
    """The skeleton two display names share when people would take them for one: NFKC
    (fullwidth ``ａ`` is ``a``), case-folded, surrounding spaces dropped and runs of spaces
    made one, look-alike letters of :data:`CONFUSABLES` mapped to Latin (Cyrillic ``аcme`` is
    ``acme``)."""
    folded = " ".join(unicodedata.normalize("NFKC", name).casefold().split())
    return unicodedata.normalize("NFKC", folded.translate(CONFUSABLES))


class NameTaken(ValueError):
    """A customer of that name, or of a name that looks the same, exists: ``existing`` is it."""

    def __init__(self, existing: dict) -> None:
        super().__init__(f"a customer named {existing['name']!r} exists already ({existing['id']})")
        self.existing = existing


# --------------------------------------------------------------------------- ports


def allocate_port(host: str, taken: set[int], port_range: tuple[int, int] = DEFAULT_PORT_RANGE) -> int:
    """A TCP port in ``port_range`` (inclusive) that is not in ``taken`` and can be bound on
    ``host`` right now (with SO_REUSEADDR, as asyncio's servers bind). The scan starts at a
    random port. Raise ``RuntimeError`` when none is free."""
    low, high = port_range
    if not 0 < low <= high <= 65535:
        raise ValueError(f"bad port range {port_range!r}")
    infos = socket.getaddrinfo(host or None, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, sockaddr = infos[0]
    span = high - low + 1
    start = random.randrange(span)
    for i in range(span):
        port = low + (start + i) % span
        if port in taken:
            continue
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((sockaddr[0], port) + tuple(sockaddr[2:]))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free TCP port in {low}-{high} on {host}")


# --------------------------------------------------------------------------- the database


class LinkRefused(Exception):
    """An agent link cannot be recorded: its token was revoked or a resource deleted meanwhile.
    ``code`` is the error code the agent gets (``revoked`` or ``deleted``), ``resource_id``
    the resource concerned."""

    def __init__(self, code: str, message: str, resource_id: str) -> None:
        super().__init__(message)
        self.code = code
        self.resource_id = resource_id


_RESOURCE_COLUMNS = "id, customer_id, name, port, generation, created_at, allow_cidrs"
_LINK_COLUMNS = ("customer_id, agent_instance, slot, epoch, relay_id, agent_id, transport, address, version, "
                 "hostname, connected_at, cert_serial")


def _in_list(values: Iterable) -> str:
    return "(" + ", ".join("?" for _ in values) + ")"


class RelayState:
    """Customers, resources, issued tokens, relays and agent links. Every method is a
    coroutine that never blocks the event loop; while the database is unreachable they raise
    :class:`relay.state.store.errors.StoreUnavailable`."""

    def __init__(self, db: Database, state_dir: str | os.PathLike) -> None:
        self.db = db
        self.state_dir = Path(state_dir)
        #: Revoked certificate serial -> its expiry, and revoked (customer, instance) -> when
        #: (Unix seconds): what :meth:`agent_certificate_revoked` answers from.
        self._revoked_serials: dict[int, float] = {}
        self._revoked_agents: dict[tuple[str, str], float] = {}
        # This process's own revocations, as they commit (first subscriber: before the cluster's).
        db.subscribe(self._heard)

    @classmethod
    async def open(
        cls,
        state_dir: str | os.PathLike,
        database_url: str | None = None,
        settings: StoreSettings | None = None,
    ) -> "RelayState":
        """Open the database (``<state_dir>/relay.db`` unless ``database_url`` names another)
        and migrate it to this code's schema. Raise ``StoreUnavailable``, ``SchemaTooNew``."""
        settings = settings or StoreSettings()
        db = await open_database(database_url, state_dir, settings)
        try:
            await migrate(db, db.description, timeout=settings.db_migration_timeout)
            state = cls(db, state_dir)
            await state.fill_name_keys()
            await state.read_revocations()
        except BaseException:
            await db.close()
            raise
        return state

    @classmethod
    async def open_dir(cls, state_dir: str | os.PathLike) -> "RelayState":
        """The embedded default: SQLite in ``state_dir``."""
        return await cls.open(state_dir)

    async def close(self) -> None:
        await self.db.close()

    async def ping(self) -> None:
        """Raise unless the database answers a query (the relay's ``/ready`` check)."""
        await self.db.fetchval("SELECT 1 FROM customers LIMIT 1")

    async def __aenter__(self) -> "RelayState":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @property
    def available(self) -> bool:
        return self.db.available

    @property
    def description(self) -> str:
        """Where the state lives (a URL without its password)."""
        return self.db.description

    @property
    def backend(self) -> str:
        return self.db.dialect.name

    def subscribe(self, callback: Subscriber) -> None:
        """Call ``callback(event)`` for every state event of every relay on this database."""
        self.db.subscribe(callback)

    async def public_can_connect(self) -> bool:
        """PostgreSQL: True when every role (PUBLIC, PostgreSQL's default) may connect to this
        database, so any of them may LISTEN to the relays' events and send forged ones
        (docs/CLUSTER.md, "Setting up PostgreSQL"). SQLite: False."""
        if self.backend != "postgresql":
            return False
        return bool(await self.db.fetchval("SELECT has_database_privilege('public', current_database(), 'CONNECT')"))

    # ---- customers

    async def create_customer(self, name: str) -> dict:
        """A new customer called ``name``. Raise :class:`NameTaken` when one of that name, or
        of a look-alike (:func:`name_key`), exists, even one created at the same moment on
        another relay; ``ValueError`` for a bad name."""
        name = validate_name(name, "customer name")
        key = name_key(name)
        existing = await self._customer_like(key)
        if existing is not None:
            raise NameTaken(existing)
        customer = {"id": new_id("cus"), "name": name, "created_at": _now_iso()}
        try:
            await self.db.execute("INSERT INTO customers (id, name, created_at, name_key) VALUES (?, ?, ?, ?)",
                                  customer["id"], customer["name"], customer["created_at"], key)
        except Conflict:
            existing = await self._customer_like(key)
            if existing is None:
                raise
            raise NameTaken(existing) from None
        return customer

    async def _customer_like(self, key: str) -> dict | None:
        row = await self.db.fetchrow("SELECT id, name, created_at FROM customers WHERE name_key = ?", key)
        if row is not None:
            return row
        # Rows older than name_key whose skeleton another row had (left NULL).
        for row in await self.db.fetch("SELECT id, name, created_at FROM customers WHERE name_key IS NULL "
                                       "AND id <> ? ORDER BY {seq}", ORG_CUSTOMER_ID):
            if name_key(row["name"]) == key:
                return row
        return None

    async def fill_name_keys(self) -> None:
        """Give rows made before schema step 5 their ``name_key`` (the first of a skeleton
        wins; later look-alikes keep NULL and are still found by :meth:`create_customer`)."""
        rows = await self.db.fetch("SELECT id, name FROM customers WHERE name_key IS NULL AND id <> ? "
                                   "ORDER BY {seq}", ORG_CUSTOMER_ID)
        for row in rows:
            try:
                await self.db.execute("UPDATE customers SET name_key = ? WHERE id = ? AND name_key IS NULL",
                                      name_key(row["name"]), row["id"])
            except Conflict:
                pass

    async def list_customers(self) -> list[dict]:
        return await self.db.fetch("SELECT id, name, created_at FROM customers ORDER BY {seq}")

    async def get_customer(self, customer_id: str) -> dict | None:
        """The customer, or ``None``. ``cus_org`` is created on first request."""
        if customer_id == ORG_CUSTOMER_ID:
            return await self.org_customer()
        return await self.db.fetchrow("SELECT id, name, created_at FROM customers WHERE id = ?", customer_id)

    async def org_customer(self) -> dict:
        """The built-in organisation customer, created lazily."""
        await self.db.execute(
            "INSERT INTO customers (id, name, created_at) VALUES (?, ?, ?) ON CONFLICT (id) DO NOTHING",
            ORG_CUSTOMER_ID, ORG_CUSTOMER_NAME, _now_iso(),
        )
        return await self.db.fetchrow("SELECT id, name, created_at FROM customers WHERE id = ?", ORG_CUSTOMER_ID)

    # ---- resources

    async def get_resource(self, resource_id: str) -> dict | None:
        return await self.db.fetchrow(f"SELECT {_RESOURCE_COLUMNS} FROM resources WHERE id = ?", resource_id)

    async def find_resource(self, customer_id: str, name: str) -> dict | None:
        return await self.db.fetchrow(
            f"SELECT {_RESOURCE_COLUMNS} FROM resources WHERE customer_id = ? AND name = ?", customer_id, name
        )

    async def list_resources(self, customer_id: str | None = None) -> list[dict]:
        if customer_id is None:
            return await self.db.fetch(f"SELECT {_RESOURCE_COLUMNS} FROM resources ORDER BY {{seq}}")
        return await self.db.fetch(
            f"SELECT {_RESOURCE_COLUMNS} FROM resources WHERE customer_id = ? ORDER BY {{seq}}", customer_id
        )

    async def resource_generations(self) -> dict[str, int]:
        """Every resource's current generation (what a relay re-reads after an outage)."""
        rows = await self.db.fetch("SELECT id, generation FROM resources")
        return {row["id"]: int(row["generation"]) for row in rows}

    async def taken_ports(self) -> set[int]:
        return {int(row["port"]) for row in await self.db.fetch("SELECT port FROM resources")}

    async def get_or_create_resource(
        self, customer_id: str, name: str, allocate_port: Callable[[set[int]], int],
        quota: Callable[[int], None] | None = None, allow_cidrs: str | None = None,
    ) -> dict:
        """The customer's resource called ``name``; created with a port from
        ``allocate_port(taken_ports)`` (and the source rule ``allow_cidrs``) when it does not
        exist. Raise ``KeyError`` for an unknown customer, ``ValueError`` for a bad name.

        ``quota(count)``, given the customer's number of resources, is called in the creating
        transaction with the customer's row locked (PostgreSQL; SQLite's write transaction is
        exclusive), so that concurrent creations, on any relay, are counted one after the
        other; whatever it raises refuses the creation."""
        name = validate_name(name, "resource name")
        existing = await self.find_resource(customer_id, name)
        if existing is not None:
            return existing
        if await self.get_customer(customer_id) is None:
            raise KeyError(f"unknown customer {customer_id}")
        taken = await self.taken_ports()
        for _ in range(16):
            port = int(allocate_port(set(taken)))
            if port in taken or not 0 < port <= 65535:
                raise RuntimeError(f"port allocator returned a taken or invalid port {port}")
            resource = {
                "id": new_id("res"),
                "customer_id": customer_id,
                "name": name,
                "port": port,
                "generation": 0,
                "created_at": _now_iso(),
                "allow_cidrs": allow_cidrs,
            }
            try:
                # Every relay binds the new resource's endpoint on this event.
                async with self.db.transaction() as tx:
                    if quota is not None:
                        lock = " FOR UPDATE" if self.db.dialect.is_postgres else ""
                        await tx.fetchval(f"SELECT id FROM customers WHERE id = ?{lock}", customer_id)
                        quota(int(await tx.fetchval("SELECT COUNT(*) FROM resources WHERE customer_id = ?",
                                                    customer_id)))
                    await tx.execute(
                        "INSERT INTO resources (id, customer_id, name, port, generation, created_at, allow_cidrs) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)",
                        resource["id"], customer_id, name, port, 0, resource["created_at"], allow_cidrs,
                    )
                    await tx.notify({"kind": "resource_created", "resource": resource})
                return resource
            except Conflict:
                # Another writer (another relay or process) won the name or the port.
                existing = await self.find_resource(customer_id, name)
                if existing is not None:
                    return existing
                taken = await self.taken_ports()
        raise RuntimeError("could not allocate a port for the resource")

    async def delete_resource(self, resource_id: str) -> bool:
        """Delete the resource (its tokens stay in the audit table) and tell every relay.
        True when it existed."""
        async with self.db.transaction() as tx:
            deleted = await tx.execute("DELETE FROM resources WHERE id = ?", resource_id)
            if deleted:
                serials = await self._revoke_scoped(tx, resource_id, "resource deleted")
                await tx.notify({"kind": "deleted", "resource_id": resource_id, "serials": serials})
        return deleted > 0

    async def set_resource_allow(self, resource_id: str, allow_cidrs: str | None) -> dict | None:
        """Set who may reach the resource's endpoint (``allow_cidrs``, None: the relay
        default) and tell every relay; the updated resource, or None when it does not exist."""
        async with self.db.transaction() as tx:
            changed = await tx.execute("UPDATE resources SET allow_cidrs = ? WHERE id = ?", allow_cidrs, resource_id)
            if not changed:
                return None
            # A hint: every relay reads the rules again from this table (relay.state.cluster).
            await tx.notify({"kind": "resource_updated", "resource_id": resource_id})
        return await self.get_resource(resource_id)

    async def resource_rules(self) -> dict[str, str | None]:
        """Every resource's ``allow_cidrs`` (what a relay re-reads after an outage)."""
        rows = await self.db.fetch("SELECT id, allow_cidrs FROM resources")
        return {row["id"]: row["allow_cidrs"] for row in rows}

    async def rotate_resource(self, resource_id: str) -> int:
        """Increment the resource's generation (revoking older tokens), tell every relay, and
        return the new generation. Raise ``KeyError`` for an unknown resource."""
        async with self.db.transaction() as tx:
            generation = await tx.fetchval(
                "UPDATE resources SET generation = generation + 1 WHERE id = ? RETURNING generation", resource_id
            )
            if generation is None:
                raise KeyError(f"unknown resource {resource_id}")
            serials = await self._revoke_scoped(tx, resource_id, "registration token rotated")
            await tx.notify({"kind": "rotated", "resource_id": resource_id, "generation": int(generation),
                             "serials": serials})
        return int(generation)

    async def count_resources(self, customer_id: str) -> int:
        """How many resources ``customer_id`` has (its quota counts them)."""
        return int(await self.db.fetchval("SELECT COUNT(*) FROM resources WHERE customer_id = ?", customer_id))

    async def mark_served(self, resource_ids, at: int) -> None:
        """Record that agents served ``resource_ids`` at ``at`` (Unix seconds)."""
        ids = list(resource_ids)
        if not ids:
            return
        await self.db.execute(f"UPDATE resources SET last_served_at = ? WHERE id IN {_in_list(ids)}", int(at), *ids)

    async def idle_resources(self, served_before: int) -> list[dict]:
        """Resources no agent has served since ``served_before`` (Unix seconds; never served:
        since created) and that no token names by id (those are the operator's to delete)."""
        return await self.db.fetch(
            f"SELECT {_RESOURCE_COLUMNS} FROM resources r "
            "WHERE COALESCE(r.last_served_at, {iso_epoch:r.created_at}) < ? "
            "AND NOT EXISTS (SELECT 1 FROM tokens t WHERE t.resource_id = r.id) ORDER BY {seq}",
            int(served_before),
        )

    # ---- tokens (audit)

    async def record_token(
        self,
        jti: str,
        customer_id: str,
        resource_id: str | None,
        generation: int,
        org_only: bool,
        issued_at: int,
        expires_at: int,
    ) -> None:
        await self.db.execute(
            "INSERT INTO tokens (jti, customer_id, resource_id, generation, org_only, issued_at, expires_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            jti, customer_id, resource_id, int(generation), int(bool(org_only)), int(issued_at), int(expires_at),
        )

    async def list_tokens(self, resource_id: str | None = None) -> list[dict]:
        if resource_id is None:
            rows = await self.db.fetch("SELECT * FROM tokens ORDER BY issued_at, jti")
        else:
            rows = await self.db.fetch("SELECT * FROM tokens WHERE resource_id = ? ORDER BY issued_at, jti",
                                       resource_id)
        for row in rows:
            row["org_only"] = bool(row["org_only"])
        return rows

    # ---- agent certificates (identities) and revocation

    def agent_certificate_revoked(self, serial: int) -> bool:
        """Whether the agent certificate ``serial`` was revoked (from memory: the revoked
        serials as last read, and this relay's own revocations as they commit)."""
        return serial in self._revoked_serials

    def agent_instance_revoked(self, customer_id: str, instance: str) -> bool:
        """Whether agent ``instance`` of ``customer_id`` was revoked as a whole (from memory)."""
        return (customer_id, instance) in self._revoked_agents

    async def record_agent_certificate(self, *, serial: int, instance: str, customer_id: str,
                                       resource_ids: list[str] | None, not_after: _dt.datetime) -> None:
        """Record a certificate the CA just issued (before the agent gets it). Raise
        :class:`LinkRefused` (``revoked``) when the instance was revoked meanwhile, on any
        relay: the row is then recorded revoked, so that the certificate is never accepted."""
        now = _dt.datetime.now(_dt.timezone.utc).timestamp()
        scope = ",".join(resource_ids) if resource_ids is not None else None
        async with self.db.transaction() as tx:
            # The customer's row locked, as revoke_agent locks it: one after the other.
            await self._lock_customer(tx, customer_id)
            revoked = await tx.fetchrow("SELECT reason FROM revoked_agents WHERE customer_id = ? AND instance = ?",
                                        customer_id, instance)
            await tx.execute(
                "INSERT INTO agent_certificates (serial, customer_id, instance, resource_ids, issued_at, not_after, "
                "revoked_at, revoked_reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                str(int(serial)), customer_id, instance, scope, now, not_after.timestamp(),
                now if revoked else None, revoked["reason"] if revoked else None)
        if revoked:
            self._revoked_serials[int(serial)] = not_after.timestamp()
            raise LinkRefused("revoked", f"agent instance {instance} is revoked", "")

    async def _lock_customer(self, tx, customer_id: str) -> None:
        lock = " FOR UPDATE" if self.db.dialect.is_postgres else ""
        await tx.fetchval(f"SELECT id FROM customers WHERE id = ?{lock}", customer_id)

    @staticmethod
    async def _revoke_scoped(tx, resource_id: str, reason: str) -> list[str]:
        """Revoke (in ``tx``) the live certificates whose scope names ``resource_id``; their serials."""
        rows = await tx.fetch(
            "UPDATE agent_certificates SET revoked_at = ?, revoked_reason = ? WHERE revoked_at IS NULL "
            "AND ',' || resource_ids || ',' LIKE ? RETURNING serial",
            _dt.datetime.now(_dt.timezone.utc).timestamp(), reason, f"%,{resource_id},%")
        return [row["serial"] for row in rows]

    async def revoke_agent(self, instance: str, customer_id: str | None = None,
                           reason: str = "revoked by the operator") -> dict:
        """Revoke agent ``instance`` (of ``customer_id``; optional when only one customer has
        an instance of that name): its certificates, its renewals, and every link of it, token
        or certificate, on every relay (event ``agents_revoked``). Return ``{"customer_id",
        "instance", "certificates"}`` (how many were revoked now). Raise ``KeyError`` when no
        certificate or live link of that instance is known, ``ValueError`` when several customers
        have one (give ``customer_id``)."""
        if customer_id is None:
            owners = {row["customer_id"] for row in await self.db.fetch(
                "SELECT customer_id FROM agent_certificates WHERE instance = ? UNION "
                "SELECT customer_id FROM agent_links WHERE agent_instance = ?", instance, instance)}
            if not owners:
                raise KeyError(f"no agent instance {instance}")
            if len(owners) > 1:
                raise ValueError(f"agent instance {instance} exists for several customers "
                                 f"({', '.join(sorted(owners))}): give the customer")
            customer_id = owners.pop()
        now = _dt.datetime.now(_dt.timezone.utc).timestamp()
        async with self.db.transaction() as tx:
            await self._lock_customer(tx, customer_id)
            known = await tx.fetchval(
                "SELECT COUNT(*) FROM agent_certificates WHERE customer_id = ? AND instance = ?",
                customer_id, instance)
            known = int(known) + int(await tx.fetchval(
                "SELECT COUNT(*) FROM agent_links WHERE customer_id = ? AND agent_instance = ?", customer_id, instance))
            if not known and not await tx.fetchval(
                    "SELECT 1 FROM revoked_agents WHERE customer_id = ? AND instance = ?", customer_id, instance):
                raise KeyError(f"no agent instance {instance} of customer {customer_id}")
            rows = await tx.fetch(
                "UPDATE agent_certificates SET revoked_at = ?, revoked_reason = ? WHERE customer_id = ? "
                "AND instance = ? AND revoked_at IS NULL RETURNING serial, not_after",
                now, reason, customer_id, instance)
            await tx.execute(
                "INSERT INTO revoked_agents (customer_id, instance, revoked_at, reason) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (customer_id, instance) DO NOTHING", customer_id, instance, now, reason)
            # In process the event carries what changed; other relays get a hint and re-read.
            await tx.notify({"kind": "agents_revoked", "agents": [[customer_id, instance, now]],
                             "serials": [[row["serial"], float(row["not_after"])] for row in rows]})
        return {"customer_id": customer_id, "instance": instance, "certificates": len(rows)}

    def _heard(self, event: dict) -> None:
        """This process's revocations, into memory as they commit (hints: :meth:`read_revocations`)."""
        if event.get("hint") or event.get("kind") not in ("agents_revoked", "rotated", "deleted"):
            return
        far = _dt.datetime.now(_dt.timezone.utc).timestamp() + CERTIFICATE_RETENTION
        for entry in event.get("serials") or ():
            serial, not_after = entry if isinstance(entry, list) else (entry, far)
            self._revoked_serials[int(serial)] = float(not_after)
        for customer_id, instance, at in event.get("agents") or ():
            self._revoked_agents[customer_id, instance] = float(at)

    async def read_revocations(self) -> None:
        """Read the revoked serials (of certificates not long expired) and instances again.
        Revocations are never undone: what was read is added, and only what has aged out
        (:data:`EXPIRY_SKEW`, :data:`REVOKED_AGENT_RETENTION`) is forgotten."""
        now = _dt.datetime.now(_dt.timezone.utc).timestamp()
        serials = await self.db.fetch(
            "SELECT serial, not_after FROM agent_certificates WHERE revoked_at IS NOT NULL AND not_after > ?",
            now - EXPIRY_SKEW)
        agents = await self.db.fetch("SELECT customer_id, instance, revoked_at FROM revoked_agents "
                                     "WHERE revoked_at > ?", now - REVOKED_AGENT_RETENTION)
        for row in serials:
            self._revoked_serials[int(row["serial"])] = float(row["not_after"])
        for row in agents:
            self._revoked_agents[row["customer_id"], row["instance"]] = float(row["revoked_at"])
        self._revoked_serials = {s: t for s, t in self._revoked_serials.items() if t > now - EXPIRY_SKEW}
        self._revoked_agents = {k: t for k, t in self._revoked_agents.items()
                                if t > now - REVOKED_AGENT_RETENTION}

    async def prune_agent_certificates(self, now: float | None = None) -> int:
        """Delete certificate rows expired for :data:`CERTIFICATE_RETENTION` and instance
        revocations older than :data:`REVOKED_AGENT_RETENTION`; how many rows went."""
        now = _dt.datetime.now(_dt.timezone.utc).timestamp() if now is None else now
        pruned = await self.db.execute("DELETE FROM agent_certificates WHERE not_after < ?",
                                       now - CERTIFICATE_RETENTION)
        return pruned + await self.db.execute("DELETE FROM revoked_agents WHERE revoked_at < ?",
                                              now - REVOKED_AGENT_RETENTION)

    async def list_agents(self, customer_id: str | None = None, live_within: float = 0.0) -> list[dict]:
        """Every agent instance known by a certificate, a revocation or a link on a relay heard
        from within ``live_within`` seconds (all customers', or one's): ``customer_id``,
        ``instance``, ``resource_ids`` (its newest certificate's scope; None: customer-wide),
        ``serial`` (int), ``issued_at`` and ``not_after`` (Unix seconds) of that certificate
        (None: linked by token only), ``certificates`` (how many are recorded), ``revoked_at``,
        ``revoked_reason``, ``links`` (live links now)."""
        where, args = ("WHERE customer_id = ?", (customer_id,)) if customer_id else ("", ())
        agents: dict[tuple[str, str], dict] = {}

        def entry(customer: str, instance: str) -> dict:
            return agents.setdefault((customer, instance), {
                "customer_id": customer, "instance": instance, "resource_ids": None, "serial": None,
                "issued_at": None, "not_after": None, "certificates": 0, "revoked_at": None,
                "revoked_reason": None, "links": 0})

        for row in await self.db.fetch(
                "SELECT serial, customer_id, instance, resource_ids, issued_at, not_after, revoked_at, revoked_reason "
                f"FROM agent_certificates {where} ORDER BY issued_at", *args):
            agent = entry(row["customer_id"], row["instance"])
            agent["certificates"] += 1
            agent.update(serial=int(row["serial"]), issued_at=float(row["issued_at"]),
                         not_after=float(row["not_after"]),
                         resource_ids=row["resource_ids"].split(",") if row["resource_ids"] is not None else None,
                         revoked_at=row["revoked_at"], revoked_reason=row["revoked_reason"])
        for row in await self.db.fetch(f"SELECT customer_id, instance, revoked_at, reason FROM revoked_agents {where}",
                                       *args):
            entry(row["customer_id"], row["instance"]).update(revoked_at=row["revoked_at"],
                                                              revoked_reason=row["reason"])
        for row in await self.db.fetch(
                "SELECT l.customer_id, l.agent_instance, COUNT(*) AS n FROM agent_links l "
                "JOIN relays r ON r.id = l.relay_id WHERE r.heartbeat_at > {now} - ? "
                + ("AND l.customer_id = ? " if customer_id else "")
                + "GROUP BY l.customer_id, l.agent_instance", float(live_within), *args):
            entry(row["customer_id"], row["agent_instance"])["links"] = int(row["n"])
        return sorted(agents.values(), key=lambda a: (a["customer_id"], a["instance"]))

    # ---- relays (membership)

    async def join_relay(self, relay_id: str, advertise_url: str, version: str, peer_address: str = "",
                         draining: bool = False) -> None:
        """Add (or renew) this relay's row and tell the others."""
        async with self.db.transaction() as tx:
            await tx.execute(
                "INSERT INTO relays (id, advertise_url, version, started_at, heartbeat_at, peer_address, draining) "
                "VALUES (?, ?, ?, {now}, {now}, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                "advertise_url = excluded.advertise_url, heartbeat_at = excluded.heartbeat_at, "
                "peer_address = excluded.peer_address, draining = excluded.draining",
                relay_id, advertise_url, version, peer_address, int(draining),
            )
            await tx.notify({"kind": "relay_joined", "relay_id": relay_id, "advertise_url": advertise_url})

    async def set_draining(self, relay_id: str) -> None:
        """Mark this relay as draining (no new agents; peers forward to it last) and tell the others."""
        async with self.db.transaction() as tx:
            await tx.execute("UPDATE relays SET draining = 1 WHERE id = ?", relay_id)
            await tx.notify({"kind": "relay_draining", "relay_id": relay_id})

    async def heartbeat(self, relay_id: str) -> bool:
        """Refresh this relay's row; False when it is gone (expired by the others)."""
        return await self.db.execute("UPDATE relays SET heartbeat_at = {now} WHERE id = ?", relay_id) > 0

    async def expire_relays(self, ttl: float) -> list[str]:
        """Remove relays (and their agent links) silent for more than ``ttl`` seconds."""
        async with self.db.transaction() as tx:
            rows = await tx.fetch("DELETE FROM relays WHERE heartbeat_at < {now} - ? RETURNING id", float(ttl))
            for row in rows:
                await tx.notify({"kind": "relay_left", "relay_id": row["id"], "expired": True})
        return [row["id"] for row in rows]

    async def leave_relay(self, relay_id: str) -> None:
        """Remove this relay's row and its agent links (a clean stop) and tell the others."""
        async with self.db.transaction() as tx:
            if await tx.execute("DELETE FROM relays WHERE id = ?", relay_id):
                await tx.notify({"kind": "relay_left", "relay_id": relay_id, "expired": False})

    async def list_relays(self) -> list[dict]:
        """Every relay with ``heartbeat_age`` (seconds, by the database's clock) and its
        number of agent ``links``."""
        return await self.db.fetch(
            "SELECT r.id, r.advertise_url, r.version, r.started_at, r.heartbeat_at, r.draining, r.peer_address, "
            "{now} - r.heartbeat_at AS heartbeat_age, "
            "(SELECT COUNT(*) FROM agent_links l WHERE l.relay_id = r.id) AS links "
            "FROM relays r ORDER BY r.started_at, r.id"
        )

    # ---- agent links

    async def add_link(self, link: dict, resource_ids: list[str], token_generation: int,
                       quota: Callable[[int], None] | None = None, live_within: float = 0.0) -> int:
        """Record a new agent link (``link`` has the ``agent_links`` columns but ``epoch``)
        serving ``resource_ids``; return its epoch, higher than any before it. Raise
        :class:`LinkRefused` when a resource is gone or rotated past ``token_generation``, or
        the agent instance is revoked (checked in the same transaction, so a rotation or a
        revocation cannot slip in between).

        ``quota(count)``, given the customer's other links on relays heard from within
        ``live_within`` seconds, is called in the transaction with the customer's row locked
        (as :meth:`get_or_create_resource`'s), so that concurrent links on every relay are
        counted one after the other; whatever it raises refuses the link."""
        async with self.db.transaction() as tx:
            if quota is not None:
                lock = " FOR UPDATE" if self.db.dialect.is_postgres else ""
                await tx.fetchval(f"SELECT id FROM customers WHERE id = ?{lock}", link["customer_id"])
                quota(int(await tx.fetchval(
                    "SELECT COUNT(*) FROM agent_links l JOIN relays r ON r.id = l.relay_id "
                    "WHERE l.customer_id = ? AND r.heartbeat_at > {now} - ? "
                    "AND NOT (l.agent_instance = ? AND l.slot = ?)",
                    link["customer_id"], float(live_within), link["agent_instance"], int(link["slot"]))))
            if await tx.fetchval("SELECT 1 FROM revoked_agents WHERE customer_id = ? AND instance = ?",
                                 link["customer_id"], link["agent_instance"]):
                raise LinkRefused("revoked", f"agent instance {link['agent_instance']} is revoked", "")
            rows = await tx.fetch(f"SELECT id, generation FROM resources WHERE id IN {_in_list(resource_ids)}",
                                  *resource_ids)
            generations = {row["id"]: int(row["generation"]) for row in rows}
            for resource_id in resource_ids:
                if resource_id not in generations:
                    raise LinkRefused("deleted", "resource deleted", resource_id)
                if generations[resource_id] > token_generation:
                    raise LinkRefused("revoked", "registration token revoked", resource_id)
            epoch = int(await tx.fetchval("{next_epoch}"))
            await self._put_link(tx, {**link, "epoch": epoch}, resource_ids)
        return epoch

    async def restore_link(self, link: dict, resource_ids: list[str]) -> bool:
        """Write ``link`` again at its own epoch (after an outage), unless a link of the same
        agent slot with a higher epoch is recorded meanwhile. True when written."""
        async with self.db.transaction() as tx:
            return await self._put_link(tx, link, resource_ids)

    @staticmethod
    async def _put_link(tx, link: dict, resource_ids: list[str]) -> bool:
        columns = [c.strip() for c in _LINK_COLUMNS.split(",")]
        changed = await tx.execute(
            f"INSERT INTO agent_links ({_LINK_COLUMNS}) VALUES {_in_list(columns)} "
            "ON CONFLICT (customer_id, agent_instance, slot) DO UPDATE SET "
            + ", ".join(f"{c} = excluded.{c}" for c in columns[3:])
            + " WHERE agent_links.epoch < excluded.epoch",
            *[link.get(c) for c in columns],  # cert_serial may be left out: a token link
        )
        if not changed:
            return False
        key = (link["customer_id"], link["agent_instance"], link["slot"])
        await tx.execute("DELETE FROM agent_link_resources WHERE customer_id = ? AND agent_instance = ? AND slot = ?",
                         *key)
        for resource_id in resource_ids:
            # A resource deleted meanwhile is simply not linked.
            await tx.execute(
                "INSERT INTO agent_link_resources (customer_id, agent_instance, slot, resource_id) "
                "SELECT ?, ?, ?, id FROM resources WHERE id = ?", *key, resource_id,
            )
        return True

    async def holders(self, resource_id: str, ttl: float) -> list[dict]:
        """The relays holding an agent link of ``resource_id``, heard from within ``ttl``
        seconds: ``relay_id``, ``peer_address``, ``draining``, ``epoch`` (the newest link's),
        the relays not draining first, then newest epoch first (a stale row never wins over
        a newer one)."""
        rows = await self.db.fetch(
            "SELECT l.relay_id, r.peer_address, r.draining, MAX(l.epoch) AS epoch "
            "FROM agent_link_resources lr JOIN agent_links l ON l.customer_id = lr.customer_id "
            "AND l.agent_instance = lr.agent_instance AND l.slot = lr.slot "
            "JOIN relays r ON r.id = l.relay_id "
            "WHERE lr.resource_id = ? AND r.heartbeat_at > {now} - ? "
            "GROUP BY l.relay_id, r.peer_address, r.draining ORDER BY r.draining, MAX(l.epoch) DESC",
            resource_id, float(ttl),
        )
        for row in rows:
            row["draining"] = bool(row["draining"])
            row["epoch"] = int(row["epoch"])
        return rows

    async def link_counts(self, ttl: float, exclude: Iterable[str] = ()) -> dict[str, int]:
        """Agent links per resource on relays heard from within ``ttl`` seconds, but the
        relays in ``exclude``."""
        exclude = sorted(exclude)
        rows = await self.db.fetch(
            "SELECT lr.resource_id, COUNT(*) AS n FROM agent_link_resources lr "
            "JOIN agent_links l ON l.customer_id = lr.customer_id AND l.agent_instance = lr.agent_instance "
            "AND l.slot = lr.slot JOIN relays r ON r.id = l.relay_id "
            "WHERE r.heartbeat_at > {now} - ? "
            + (f"AND r.id NOT IN {_in_list(exclude)} " if exclude else "")
            + "GROUP BY lr.resource_id", float(ttl), *exclude,
        )
        return {row["resource_id"]: int(row["n"]) for row in rows}

    async def remove_link(self, customer_id: str, agent_instance: str, slot: int, epoch: int) -> bool:
        """Remove the link row only if it is still the one at ``epoch`` (a newer link of the
        same agent slot, on any relay, stays)."""
        return await self.db.execute(
            "DELETE FROM agent_links WHERE customer_id = ? AND agent_instance = ? AND slot = ? AND epoch = ?",
            customer_id, agent_instance, int(slot), int(epoch),
        ) > 0

    async def list_links(self, relay_id: str | None = None) -> list[dict]:
        """Agent links (all, or one relay's), newest epoch first, each with the relay's
        ``advertise_url``, the ``resources`` it serves and its certificate's ``cert_not_after``
        (None: a token link, or a certificate not recorded)."""
        where, args = ("WHERE l.relay_id = ?", (relay_id,)) if relay_id else ("", ())
        links = await self.db.fetch(
            f"SELECT {', '.join('l.' + c.strip() for c in _LINK_COLUMNS.split(','))}, r.advertise_url, "
            "c.not_after AS cert_not_after FROM agent_links l JOIN relays r ON r.id = l.relay_id "
            f"LEFT JOIN agent_certificates c ON c.serial = l.cert_serial {where} ORDER BY l.epoch DESC", *args
        )
        served = await self.db.fetch(
            "SELECT lr.customer_id, lr.agent_instance, lr.slot, lr.resource_id FROM agent_link_resources lr "
            + ("JOIN agent_links l ON l.customer_id = lr.customer_id AND l.agent_instance = lr.agent_instance "
               "AND l.slot = lr.slot WHERE l.relay_id = ?" if relay_id else ""), *args
        )
        by_key: dict[tuple, list[str]] = {}
        for row in served:
            by_key.setdefault((row["customer_id"], row["agent_instance"], row["slot"]), []).append(row["resource_id"])
        for link in links:
            link["resources"] = sorted(by_key.get((link["customer_id"], link["agent_instance"], link["slot"]), []))
        return links


__all__ = [
    "DEFAULT_PORT_RANGE",
    "ORG_CUSTOMER_ID",
    "ORG_CUSTOMER_NAME",
    "SCHEMA_VERSION",
    "Conflict",
    "LinkRefused",
    "NameTaken",
    "RelayState",
    "StateWriteFailed",
    "StoreSettings",
    "StoreUnavailable",
    "allocate_port",
    "ensure_state_dir",
    "name_key",
    "new_id",
    "state_write_failure",
    "validate_name",
    "write_private",
]
