"""The schema, as one ordered list of versioned steps that both back ends run.

A step is a list of statements written once (``?`` placeholders and the dialect markers of
:mod:`relay.state.store.dialect`). :func:`migrate` runs, at start and in one exclusive transaction,
every step above the database's version, so two relays starting at once never both migrate,
and a database newer than :data:`SCHEMA_VERSION` is refused. A schema change is a new step
appended here, never an edit of a step that has shipped.

Version 1 is the schema relay.db files have had from the start (``PRAGMA user_version = 1``),
and version 2 what the relay made of them before this module (``last_served_at``), so both
migrate forward in place.
"""

from __future__ import annotations

import dataclasses
import logging

from .errors import SchemaTooNew

log = logging.getLogger("relay.store")


@dataclasses.dataclass(frozen=True)
class Step:
    version: int
    name: str
    statements: tuple[str, ...]
    #: Statements for one dialect only (by name), after the shared ones.
    only: tuple[tuple[str, str], ...] = ()

    def for_dialect(self, dialect_name: str) -> list[str]:
        return list(self.statements) + [sql for name, sql in self.only if name == dialect_name]


MIGRATIONS: tuple[Step, ...] = (
    Step(1, "customers, resources, tokens", (
        """CREATE TABLE customers (
            {seq_column}
            id          TEXT PRIMARY KEY,
            name        TEXT NOT NULL,
            created_at  TEXT NOT NULL
        )""",
        """CREATE TABLE resources (
            {seq_column}
            id          TEXT PRIMARY KEY,
            customer_id TEXT NOT NULL REFERENCES customers(id),
            name        TEXT NOT NULL,
            port        INTEGER NOT NULL,
            generation  INTEGER NOT NULL DEFAULT 0,
            created_at  TEXT NOT NULL,
            UNIQUE (customer_id, name),
            UNIQUE (port)
        )""",
        """CREATE TABLE tokens (
            jti         TEXT PRIMARY KEY,
            customer_id TEXT NOT NULL,
            resource_id TEXT,
            generation  INTEGER NOT NULL,
            org_only    INTEGER NOT NULL,
            issued_at   INTEGER NOT NULL,
            expires_at  INTEGER NOT NULL
        )""",
        "CREATE INDEX tokens_by_resource ON tokens(resource_id)",
    )),
    # resources.last_served_at: Unix seconds an agent last served the resource (NULL: never,
    # then created_at counts); resources that exist already get a full idle period.
    Step(2, "resources.last_served_at", (
        "ALTER TABLE resources ADD COLUMN last_served_at BIGINT",
        "UPDATE resources SET last_served_at = CAST({now} AS BIGINT)",
    )),
    Step(3, "cluster: relays, agent links with epochs", (
        # One row per relay process (a new id at every start), kept alive by heartbeats.
        """CREATE TABLE relays (
            id            TEXT PRIMARY KEY,
            advertise_url TEXT NOT NULL,
            version       TEXT NOT NULL,
            started_at    {real} NOT NULL,
            heartbeat_at  {real} NOT NULL,
            draining      INTEGER NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX relays_by_heartbeat ON relays(heartbeat_at)",
        # Which relay holds which agent link. One row per (customer, agent instance, slot): a
        # newer link of the same slot replaces the row only with a higher epoch, and a relay
        # removes a row only at the epoch it wrote, so a late write never wins.
        """CREATE TABLE agent_links (
            customer_id    TEXT NOT NULL,
            agent_instance TEXT NOT NULL,
            slot           INTEGER NOT NULL,
            epoch          BIGINT NOT NULL,
            relay_id       TEXT NOT NULL REFERENCES relays(id) ON DELETE CASCADE,
            agent_id       TEXT NOT NULL,
            transport      TEXT NOT NULL,
            address        TEXT NOT NULL,
            version        TEXT NOT NULL,
            hostname       TEXT NOT NULL,
            connected_at   {real} NOT NULL,
            PRIMARY KEY (customer_id, agent_instance, slot)
        )""",
        "CREATE INDEX agent_links_by_relay ON agent_links(relay_id)",
        """CREATE TABLE agent_link_resources (
            customer_id    TEXT NOT NULL,
            agent_instance TEXT NOT NULL,
            slot           INTEGER NOT NULL,
            resource_id    TEXT NOT NULL REFERENCES resources(id) ON DELETE CASCADE,
            PRIMARY KEY (customer_id, agent_instance, slot, resource_id),
            FOREIGN KEY (customer_id, agent_instance, slot)
                REFERENCES agent_links(customer_id, agent_instance, slot) ON DELETE CASCADE
        )""",
        "CREATE INDEX agent_link_resources_by_resource ON agent_link_resources(resource_id)",
    ), only=(
        ("sqlite", "CREATE TABLE sequences (name TEXT PRIMARY KEY, value INTEGER NOT NULL)"),
        ("sqlite", "INSERT INTO sequences (name, value) VALUES ('link_epoch', 0)"),
        ("postgresql", "CREATE SEQUENCE link_epoch"),
    )),
    # Where the other relays reach this one to forward streams (relay.data.peering): host:port of
    # its peer listener, empty when it has none (SQLite: a single relay).
    Step(4, "relays.peer_address", (
        "ALTER TABLE relays ADD COLUMN peer_address TEXT NOT NULL DEFAULT ''",
    )),
    # One customer per name, under concurrency: name_key is the name's skeleton
    # (relay.state.name_key: NFKC, case-folded, look-alike letters mapped), unique. Rows made
    # before this step get theirs when a relay opens the database (NULL for a second of a
    # skeleton, which stays as it was; new names are checked against it too).
    Step(5, "customers.name_key", (
        "ALTER TABLE customers ADD COLUMN name_key TEXT",
        "CREATE UNIQUE INDEX customers_by_name_key ON customers(name_key)",
    )),
    # Who may reach a resource's endpoint (relay.state.access): source CIDRs, comma-separated;
    # NULL: the relay's --service-allow applies.
    Step(6, "resources.allow_cidrs", (
        "ALTER TABLE resources ADD COLUMN allow_cidrs TEXT",
    )),
    # Agent identities (relay.state.relay_state, "agent certificates"): every client certificate
    # the relay's CA issued at an enrolment (serial as decimal text: up to 159 bits; resource_ids
    # comma-separated, NULL for a customer-wide scope; times in Unix seconds), and the agent
    # instances revoked as a whole (their links refused, token or certificate alike); and the
    # certificate each agent link authenticated with (NULL: a registration token).
    Step(7, "agent_certificates, revoked_agents, agent_links.cert_serial", (
        """CREATE TABLE agent_certificates (
            serial         TEXT PRIMARY KEY,
            customer_id    TEXT NOT NULL,
            instance       TEXT NOT NULL,
            resource_ids   TEXT,
            issued_at      {real} NOT NULL,
            not_after      {real} NOT NULL,
            revoked_at     {real},
            revoked_reason TEXT
        )""",
        "CREATE INDEX agent_certificates_by_instance ON agent_certificates(customer_id, instance)",
        "CREATE INDEX agent_certificates_by_expiry ON agent_certificates(not_after)",
        """CREATE TABLE revoked_agents (
            customer_id TEXT NOT NULL,
            instance    TEXT NOT NULL,
            revoked_at  {real} NOT NULL,
            reason      TEXT NOT NULL,
            PRIMARY KEY (customer_id, instance)
        )""",
        "ALTER TABLE agent_links ADD COLUMN cert_serial TEXT",
    )),
)

#: The newest schema version this code knows.
SCHEMA_VERSION = MIGRATIONS[-1].version


async def migrate(db, where: str, *, timeout: float | None = None) -> tuple[int, int]:
    """Bring ``db`` (a :class:`relay.state.store.database.Database`) to :data:`SCHEMA_VERSION`.
    Return ``(version before, version after)``. Raise :class:`SchemaTooNew` when the database
    is ahead of this code (``where`` names it in the message)."""
    dialect = db.dialect
    async with db.transaction(timeout=timeout) as tx:
        for statement in dialect.migration_lock():
            await tx.execute(statement)
        before = await dialect.read_version(tx)
        if before > SCHEMA_VERSION:
            raise SchemaTooNew(where, before, SCHEMA_VERSION)
        for step in MIGRATIONS:
            if step.version <= before:
                continue
            for statement in step.for_dialect(dialect.name):
                await tx.execute(statement)
            await dialect.write_version(tx, step.version, step.name)
    if before < SCHEMA_VERSION:
        log.info("state database %s migrated from schema version %d to %d", where, before, SCHEMA_VERSION)
    return before, SCHEMA_VERSION
