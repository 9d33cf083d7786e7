"""relay.state.store and the cluster tables: migrations (from empty, from a v1 relay.db, concurrent,
too new), events across relays, agent links and their epochs, membership, and PostgreSQL
going away (stopped, hung, cut off from one relay) and coming back. Tests taking ``state`` run
on both back ends; the others name theirs."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from relay.state.cluster import Cluster
from relay.state.relay_state import LinkRefused, RelayState
from relay.state.store.database import redact_url
from relay.state.store.dialect import MIGRATION_LOCK_KEY, POSTGRES, SQLITE
from relay.state.store.errors import SchemaTooNew, StoreUnavailable
from relay.state.store.migrations import SCHEMA_VERSION
from relay.state.store.settings import StoreSettings
from tests.helpers import async_wait_until
from tests.helpers.sync_state import new_loop
from tests.helpers.tcp_proxy import TcpProxy

ROOT = Path(__file__).resolve().parents[3]
FAST = StoreSettings(db_connect_timeout=1.0, db_query_timeout=1.0, db_reconnect_max=0.3, heartbeat_interval=0.5,
                     member_ttl=5.0)

#: The schema relay.db files were created with before migrations existed (PRAGMA user_version 1).
V1_SCHEMA = """
CREATE TABLE customers (id TEXT PRIMARY KEY, name TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE resources (
    id TEXT PRIMARY KEY, customer_id TEXT NOT NULL REFERENCES customers(id), name TEXT NOT NULL,
    port INTEGER NOT NULL, generation INTEGER NOT NULL DEFAULT 0, created_at TEXT NOT NULL,
    UNIQUE (customer_id, name), UNIQUE (port));
CREATE TABLE tokens (jti TEXT PRIMARY KEY, customer_id TEXT NOT NULL, resource_id TEXT, generation INTEGER NOT NULL,
    org_only INTEGER NOT NULL, issued_at INTEGER NOT NULL, expires_at INTEGER NOT NULL);
CREATE INDEX tokens_by_resource ON tokens(resource_id);
PRAGMA user_version = 1;
"""


def run(coro):
    loop = new_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


def link_row(customer_id: str, instance: str = "inst1", relay_id: str = "rly_a", agent_id: str = "agt_1",
             slot: int = 0) -> dict:
    return {"customer_id": customer_id, "agent_instance": instance, "slot": slot, "relay_id": relay_id,
            "agent_id": agent_id, "transport": "wss", "address": "192.0.2.1:4000", "version": "0.1.0",
            "hostname": "db-host", "connected_at": time.time()}


# --------------------------------------------------------------------------- pieces


def test_dialects_render_one_text_two_ways():
    sql = "SELECT id FROM resources WHERE id = ? AND port = ? ORDER BY {seq}"
    assert SQLITE.render(sql) == "SELECT id FROM resources WHERE id = ? AND port = ? ORDER BY rowid"
    assert POSTGRES.render(sql) == "SELECT id FROM resources WHERE id = $1 AND port = $2 ORDER BY seq"
    assert "julianday" in SQLITE.render("{now}") and "clock_timestamp" in POSTGRES.render("{now}")
    assert POSTGRES.migration_lock() == [f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})"]
    assert SQLITE.migration_lock() == []


def test_placeholders_are_numbered_outside_literals_and_comments():
    sql = ("SELECT ?, 'why?', 'it''s ?', E'\\'?', \"odd?name\", $$ ? $$, $q$ ?$ $q$ -- later?\n"
           "FROM t /* ? */ WHERE a = ? AND b = ?")
    assert POSTGRES.render(sql) == ("SELECT $1, 'why?', 'it''s ?', E'\\'?', \"odd?name\", $$ ? $$, $q$ ?$ $q$ -- later?\n"
                                    "FROM t /* ? */ WHERE a = $2 AND b = $3")
    assert SQLITE.render(sql) == sql
    for unclosed in ("SELECT '?", 'SELECT "?', "SELECT /* ?", "SELECT $$ ?"):
        with pytest.raises(ValueError, match="unterminated"):
            POSTGRES.render(unclosed)


def test_a_question_mark_in_a_literal_is_text_on_both_back_ends(state):
    db = state.state.db
    assert state.run(db.fetchval("SELECT 'why?' || ? || '?'", "not")) == "why?not?"
    assert state.run(db.fetchrow("SELECT ? AS a, /* ? */ 'b?' AS b", "x")) == {"a": "x", "b": "b?"}


def test_settings_are_documented_and_overridable():
    doc = (ROOT / "docs" / "CLUSTER.md").read_text()
    missing = [f.name for f in dataclasses.fields(StoreSettings) if f"`RELAY_{f.name.upper()}`" not in doc]
    assert not missing, f"docs/CLUSTER.md does not list: {missing}"
    settings = StoreSettings.from_env({"RELAY_HEARTBEAT_INTERVAL": "1", "RELAY_DB_POOL_SIZE": "2"})
    assert settings.heartbeat_interval == 1.0 and settings.db_pool_size == 2
    with pytest.raises(ValueError, match="RELAY_DB_QUERY_TIMEOUT must be a number"):
        StoreSettings.from_env({"RELAY_DB_QUERY_TIMEOUT": "soon"})
    with pytest.raises(ValueError, match="member_ttl must exceed"):
        StoreSettings.from_env({"RELAY_MEMBER_TTL": "6"})


def test_database_urls_are_shown_without_their_password():
    assert redact_url("postgresql://relay:s3cret@db.example:5432/tunnel") == "postgresql://relay@db.example:5432/tunnel"
    assert redact_url("postgresql://db.example/tunnel") == "postgresql://db.example/tunnel"
    assert "s3cret" not in redact_url("postgres://:s3cret@h/d")
    # And the logs' last line of defence, should a URL with a password ever reach a log line.
    from tunnel.ops.logs import redact

    assert redact("dsn postgresql://relay:s3cret@db:5432/t failed") == "dsn postgresql://relay:[redacted]@db:5432/t failed"
    assert redact("see http://example.com/a@b") == "see http://example.com/a@b"


# --------------------------------------------------------------------------- migrations


def test_a_v1_relay_db_migrates_in_place(tmp_path):
    directory = tmp_path / "state"
    directory.mkdir(mode=0o700)
    con = sqlite3.connect(directory / "relay.db")
    con.executescript(V1_SCHEMA)
    con.execute("INSERT INTO customers VALUES ('cus_aaaaaaaaaaaaaaaa', 'acme', '2024-01-01T00:00:00Z')")
    con.execute("INSERT INTO customers VALUES ('cus_bbbbbbbbbbbbbbbb', 'globex', '2024-01-01T00:00:00Z')")
    con.execute("INSERT INTO resources VALUES ('res_aaaaaaaaaaaaaaaa', 'cus_aaaaaaaaaaaaaaaa', 'db', 21000, 3, "
                "'2024-01-01T00:00:00Z')")
    con.execute("INSERT INTO tokens VALUES ('jti-1', 'cus_aaaaaaaaaaaaaaaa', 'res_aaaaaaaaaaaaaaaa', 3, 0, 1, 2)")
    con.commit()
    con.close()

    async def go():
        async with await RelayState.open(directory) as st:
            assert [c["name"] for c in await st.list_customers()] == ["acme", "globex"]
            resource = await st.get_resource("res_aaaaaaaaaaaaaaaa")
            assert (resource["port"], resource["generation"]) == (21000, 3)
            assert [t["jti"] for t in await st.list_tokens()] == ["jti-1"]
            await st.join_relay("rly_a", "wss://127.0.0.1:8443", "0.1.0")
            epoch = await st.add_link(link_row("cus_aaaaaaaaaaaaaaaa"), [resource["id"]], 3)
            assert epoch == 1

    run(go())
    con = sqlite3.connect(directory / "relay.db")
    try:
        assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert [r[0] for r in con.execute("SELECT version FROM schema_migrations ORDER BY version")] == \
            list(range(2, SCHEMA_VERSION + 1))
    finally:
        con.close()
    run(RelayState.open(directory)).db.close_sync()  # opening again migrates nothing


def test_a_version_2_relay_db_migrates_in_place(tmp_path):
    """Files of the relay before the store (user_version 2: last_served_at) take step 3 only."""
    con = sqlite3.connect(tmp_path / "relay.db")
    con.executescript(V1_SCHEMA)
    con.execute("ALTER TABLE resources ADD COLUMN last_served_at INTEGER")
    con.execute("INSERT INTO customers VALUES ('cus_aaaaaaaaaaaaaaaa', 'acme', '2024-01-01T00:00:00Z')")
    con.execute("INSERT INTO resources VALUES ('res_aaaaaaaaaaaaaaaa', 'cus_aaaaaaaaaaaaaaaa', 'db', 21000, 0, "
                "'2024-01-01T00:00:00Z', 1700000000)")
    con.execute("PRAGMA user_version = 2")
    con.commit()
    con.close()

    async def go():
        async with await RelayState.open(tmp_path) as st:
            assert [r["id"] for r in await st.idle_resources(1700000001)] == ["res_aaaaaaaaaaaaaaaa"]
            assert await st.idle_resources(1700000000) == []  # its last_served_at was kept
            await st.join_relay("rly_a", "wss://127.0.0.1:8443", "0.1.0")
            return await st.db.fetch("SELECT version FROM schema_migrations")

    assert [r["version"] for r in run(go())] == list(range(3, SCHEMA_VERSION + 1))


def test_postgres_migrates_from_empty_and_refuses_a_newer_schema(tmp_path, postgres_server, postgres_url):
    async def versions():
        async with await RelayState.open(tmp_path, postgres_url) as st:
            rows = await st.db.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
            return [r["version"] for r in rows]

    assert run(versions()) == list(range(1, SCHEMA_VERSION + 1))
    assert run(versions()) == list(range(1, SCHEMA_VERSION + 1))
    database = postgres_url.rsplit("/", 1)[1]
    postgres_server.psql(f"INSERT INTO schema_migrations VALUES ({SCHEMA_VERSION + 1}, 'from the future', 0)",
                         database)
    with pytest.raises(SchemaTooNew, match=f"schema version {SCHEMA_VERSION + 1}, newer than this relay"):
        run(RelayState.open(tmp_path, postgres_url))


def test_a_statement_costs_one_round_trip_on_postgres(tmp_path, postgres_server, postgres_url):
    """The pool takes a connection back without asyncpg's default reset (``RESET ALL``,
    ``UNLISTEN *`` ...: a second round trip per statement, and a registration runs about ten):
    the last query each pool connection ran is ours."""
    async def statements():
        async with await RelayState.open(tmp_path, postgres_url) as st:
            for i in range(5):
                assert await st.db.fetchval(f"SELECT {i} AS round_trip_probe") == i
            async with st.db.transaction() as tx:
                await tx.fetchval("SELECT 1 AS round_trip_probe")
            database = postgres_url.rsplit("/", 1)[1]
            return postgres_server.psql(
                "SELECT query FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND query NOT LIKE 'LISTEN%'", database).splitlines()

    last = run(statements())
    assert last and not [q for q in last if "RESET ALL" in q or "UNLISTEN" in q], last


MIGRATE_ONE = """
import asyncio, sys
from relay.state.store.migrations import migrate
from relay.state.store.connect import open_database
async def main():
    db = await open_database(sys.argv[1], sys.argv[2])
    before, after = await migrate(db, 'test')
    print(before, after, flush=True)
    await db.close()
asyncio.run(main())
"""


def test_two_relays_starting_at_once_migrate_once(tmp_path, postgres_server, postgres_url):
    """The test holds the migration lock while two processes start: both must wait for it,
    then exactly one migrates and the other finds the work done."""
    import asyncpg

    async def scenario():
        holder = await asyncpg.connect(postgres_url)
        await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        procs = [subprocess.Popen([sys.executable, "-c", MIGRATE_ONE, postgres_url, str(tmp_path / f"s{i}")],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for i in range(2)]
        try:
            deadline = time.monotonic() + 30
            while True:
                waiting = await holder.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
                if waiting == 2:
                    break
                assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
                assert time.monotonic() < deadline, "the two processes never waited for the migration lock"
                await asyncio.sleep(0.05)
            await holder.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
            outputs = [await asyncio.to_thread(p.communicate, timeout=60) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            await holder.close()
        return procs, outputs

    procs, outputs = run(scenario())
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err
    assert sorted(out.split() for out, _ in outputs) == [["0", str(SCHEMA_VERSION)],
                                                        [str(SCHEMA_VERSION), str(SCHEMA_VERSION)]]
    database = postgres_url.rsplit("/", 1)[1]
    assert postgres_server.psql("SELECT string_agg(version::text, ',' ORDER BY version) FROM schema_migrations",
                                database) == ",".join(str(v) for v in range(1, SCHEMA_VERSION + 1))


# --------------------------------------------------------------------------- events


def test_rotate_and_delete_are_published_once_in_process(state):
    events = []
    state.subscribe(events.append)
    customer = state.create_customer("acme")
    db = state.get_or_create_resource(customer["id"], "db", lambda taken: 21000)
    assert state.rotate_resource(db["id"]) == 1
    assert state.delete_resource(db["id"]) is True
    assert state.delete_resource(db["id"]) is False
    with pytest.raises(KeyError):
        state.rotate_resource(db["id"])
    state.run(asyncio.sleep(0.2))  # a notification of our own, if one came back, would be here now
    assert events == [{"kind": "resource_created", "resource": db},
                      {"kind": "rotated", "resource_id": db["id"], "generation": 1, "serials": []},
                      {"kind": "deleted", "resource_id": db["id"], "serials": []}]


def test_events_reach_the_other_relays_on_postgres(tmp_path, postgres_url):
    async def go():
        a = await RelayState.open(tmp_path / "a", postgres_url)
        b = await RelayState.open(tmp_path / "b", postgres_url)
        try:
            arrived: asyncio.Queue = asyncio.Queue()
            b.subscribe(lambda event: arrived.put_nowait((time.monotonic(), event)))
            customer = await a.create_customer("acme")
            db = await a.get_or_create_resource(customer["id"], "db", lambda taken: 21000)
            # Other relays hear the kind of change only (a hint to re-read the tables).
            assert (await asyncio.wait_for(arrived.get(), 2))[1] == {"kind": "resource_created", "hint": True}
            start = time.monotonic()
            await a.rotate_resource(db["id"])
            at, event = await asyncio.wait_for(arrived.get(), 2)
            assert event == {"kind": "rotated", "hint": True}
            assert at - start < 2
            await a.delete_resource(db["id"])
            assert (await asyncio.wait_for(arrived.get(), 2))[1] == {"kind": "deleted", "hint": True}
            # A rolled-back transaction publishes nothing.
            with pytest.raises(RuntimeError):
                async with a.db.transaction() as tx:
                    await tx.notify({"kind": "rotated", "resource_id": "res_x", "generation": 9})
                    raise RuntimeError("abort")
            await a.join_relay("rly_a", "wss://127.0.0.1:1", "0")
            assert (await asyncio.wait_for(arrived.get(), 2))[1]["kind"] == "relay_joined"
        finally:
            await a.close()
            await b.close()

    run(go())


# --------------------------------------------------------------------------- links, epochs, membership


def test_agent_links_and_their_epochs(state):
    customer = state.create_customer("acme")
    db = state.get_or_create_resource(customer["id"], "db", lambda taken: 21000)
    api = state.get_or_create_resource(customer["id"], "api", lambda taken: 21001)
    state.join_relay("rly_a", "wss://10.0.0.1:8443", "0.1.0")
    state.join_relay("rly_b", "wss://10.0.0.2:8443", "0.1.0")

    first = state.add_link(link_row(customer["id"], relay_id="rly_a", agent_id="agt_a"), [db["id"], api["id"]], 0)
    # The same agent slot reconnects to relay B before A noticed: B's row replaces A's ...
    second = state.add_link(link_row(customer["id"], relay_id="rly_b", agent_id="agt_b"), [db["id"]], 0)
    assert second > first
    links = state.list_links()
    assert [(l["relay_id"], l["epoch"], l["resources"]) for l in links] == [("rly_b", second, [db["id"]])]
    assert links[0]["advertise_url"] == "wss://10.0.0.2:8443"
    # ... and A's late removal, or its rewrite after an outage, cannot take it back.
    assert state.remove_link(customer["id"], "inst1", 0, first) is False
    assert state.restore_link({**link_row(customer["id"], relay_id="rly_a"), "epoch": first}, [db["id"]]) is False
    assert [l["relay_id"] for l in state.list_links()] == ["rly_b"]
    # Another slot of the same agent is another row; per relay listing.
    third = state.add_link(link_row(customer["id"], relay_id="rly_a", slot=1), [api["id"]], 0)
    assert [l["epoch"] for l in state.list_links()] == [third, second]
    assert [l["slot"] for l in state.list_links("rly_a")] == [1]
    assert {r["id"]: r["links"] for r in state.list_relays()} == {"rly_a": 1, "rly_b": 1}
    # Deleting a resource unlinks it; removing the row at its epoch works.
    state.delete_resource(api["id"])
    assert [l["resources"] for l in state.list_links("rly_a")] == [[]]
    assert state.remove_link(customer["id"], "inst1", 1, third) is True
    assert [l["relay_id"] for l in state.list_links()] == ["rly_b"]


def test_a_link_is_refused_when_its_token_was_revoked_meanwhile(state):
    customer = state.create_customer("acme")
    db = state.get_or_create_resource(customer["id"], "db", lambda taken: 21000)
    state.join_relay("rly_a", "wss://10.0.0.1:8443", "0.1.0")
    state.rotate_resource(db["id"])
    with pytest.raises(LinkRefused) as info:
        state.add_link(link_row(customer["id"]), [db["id"]], 0)
    assert info.value.code == "revoked"
    assert state.add_link(link_row(customer["id"]), [db["id"]], 1) > 0
    state.delete_resource(db["id"])
    with pytest.raises(LinkRefused) as info:
        state.add_link(link_row(customer["id"], instance="inst2"), [db["id"]], 1)
    assert info.value.code == "deleted"


def test_membership_heartbeat_expiry_and_leaving(state):
    events = []
    state.subscribe(events.append)
    customer = state.create_customer("acme")
    db = state.get_or_create_resource(customer["id"], "db", lambda taken: 21000)
    state.join_relay("rly_a", "wss://10.0.0.1:8443", "0.1.0")
    state.join_relay("rly_b", "wss://10.0.0.2:8443", "0.1.0")
    state.add_link(link_row(customer["id"], relay_id="rly_b"), [db["id"]], 0)
    assert state.heartbeat("rly_a") is True
    assert state.heartbeat("rly_gone") is False
    relays = {r["id"]: r for r in state.list_relays()}
    assert set(relays) == {"rly_a", "rly_b"} and 0 <= relays["rly_a"]["heartbeat_age"] < 5
    assert state.expire_relays(3600.0) == []
    state.run(asyncio.sleep(0.05))
    state.heartbeat("rly_a")
    # rly_b has been silent for longer than rly_a: expire it alone, with its agent links.
    age_b = {r["id"]: r["heartbeat_age"] for r in state.list_relays()}["rly_b"]
    assert state.expire_relays(age_b / 2) == ["rly_b"]
    assert state.list_links() == []
    state.leave_relay("rly_a")
    assert state.list_relays() == []
    kinds = [(e["kind"], e["relay_id"]) for e in events if e["kind"].startswith("relay_")]
    assert kinds == [("relay_joined", "rly_a"), ("relay_joined", "rly_b"), ("relay_left", "rly_b"),
                     ("relay_left", "rly_a")]


# --------------------------------------------------------------------------- PostgreSQL away


def test_postgres_stopped_fails_fast_then_recovers(tmp_path, postgres_server, postgres_url):
    async def go():
        st = await RelayState.open(tmp_path, postgres_url, FAST)
        events = []
        st.subscribe(events.append)
        try:
            await st.create_customer("acme")
            await asyncio.to_thread(postgres_server.stop)
            try:
                with pytest.raises(StoreUnavailable, match="state database unreachable"):
                    await st.list_customers()
                # From now on every call fails at once, without trying the network.
                start = time.monotonic()
                for _ in range(100):
                    with pytest.raises(StoreUnavailable):
                        await st.create_customer("x")
                assert time.monotonic() - start < 0.5
                assert not st.available
            finally:
                await asyncio.to_thread(postgres_server.start)
            await async_wait_until(lambda: st.available, 20, "the reconnection")
            assert {"kind": "reconnected"} in events
            assert [c["name"] for c in await st.list_customers()] == ["acme"]
        finally:
            await st.close()

    run(go())


def test_postgres_hung_gives_up_at_the_timeout_without_blocking_the_loop(tmp_path, postgres_server, postgres_url):
    def freeze(sig):
        master = postgres_server.postmaster_pid()
        children = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True).stdout.split()
        for pid in [master, *map(int, children)]:
            os.kill(pid, sig)

    async def go():
        st = await RelayState.open(tmp_path, postgres_url, FAST)
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.get_running_loop().create_task(ticker())
        try:
            freeze(signal.SIGSTOP)
            try:
                start = time.monotonic()
                with pytest.raises(StoreUnavailable):
                    await st.list_customers()
                elapsed = time.monotonic() - start
                # Known unreachable now: the next calls fail at once instead of waiting again.
                start = time.monotonic()
                for _ in range(20):
                    with pytest.raises(StoreUnavailable):
                        await st.get_resource("res_aaaaaaaaaaaaaaaa")
                assert time.monotonic() - start < FAST.db_connect_timeout
            finally:
                freeze(signal.SIGCONT)
            assert FAST.db_query_timeout * 0.9 <= elapsed < FAST.db_query_timeout + 2
            # A loop blocked on the query would not have ticked at all (10 ms ticks; a loaded
            # machine may slow them a lot, hence the low bar).
            assert ticks > 5, "the event loop was blocked during the query"
            await async_wait_until(lambda: st.available, 20, "the reconnection")
            assert await st.list_customers() == []
        finally:
            task.cancel()
            await st.close()

    run(go())


class FakeLink:
    carrier = "wss"
    peer_address = ("192.0.2.7", 50000)


class FakeSession:
    """What the cluster reads of a registry session."""

    def __init__(self, customer_id: str, resources: dict, generation: int = 0) -> None:
        self.agent_id = "agt_1"
        self.link = FakeLink()
        self.customer_id = customer_id
        self.generation = generation
        self.version = "0.1.0"
        self.hostname = "db-host"
        self.resources = resources
        self.instance = "inst1"
        self.slot = 0
        self.cert_serial = None
        self.epoch = 0
        self.connected_since = time.time()


def test_a_revocation_arriving_during_registration_refuses_it(tmp_path, state):
    """The rotation is heard (as a notification from another relay would be) after the link
    was recorded but before the agent enters the registry: the registration must fail and
    its link row go."""
    from tunnel.wire.errors import AuthError

    customer = state.create_customer("acme")
    db = state.get_or_create_resource(customer["id"], "db", lambda taken: 21000)
    registry = RecordingRegistry([db["id"]])
    cluster = Cluster(state.state, registry, "wss://127.0.0.1:8443", FAST)
    state.run(cluster.start())
    real_add_link = state.state.add_link

    async def add_link_then_hear_a_rotation(*args):
        epoch = await real_add_link(*args)
        cluster.on_event({"kind": "rotated", "resource_id": db["id"], "generation": 1})
        return epoch

    state.state.add_link = add_link_then_hear_a_rotation
    session = FakeSession(customer["id"], {db["id"]: "db"})
    with pytest.raises(AuthError) as info:
        state.run(cluster.admit(session))
    assert info.value.code == "revoked"
    async def removed():  # in the background
        return await state.state.list_links() == []

    state.run(async_wait_until(removed, 10, "the link row to go"))
    # Without a rotation in between, the same registration goes through.
    state.state.add_link = real_add_link
    accepted = FakeSession(customer["id"], {db["id"]: "db"})
    state.run(cluster.admit(accepted))
    assert [(link["agent_id"], link["epoch"]) for link in state.list_links()] == [("agt_1", accepted.epoch)]
    state.run(cluster.stop())


def test_a_rotation_hinted_during_registration_refuses_it(state):
    """As above, but heard as a notification is now: a hint naming only its kind. The relay
    re-reads the table, and the registration in flight is refused all the same; a hint with no
    change behind it (anyone may send one) refuses nothing and drops nobody."""
    from tunnel.wire.errors import AuthError

    customer = state.create_customer("acme")
    db = state.get_or_create_resource(customer["id"], "db", lambda taken: 21000)
    registry = RecordingRegistry([db["id"]])
    cluster = Cluster(state.state, registry, "wss://127.0.0.1:8443", FAST)
    state.run(cluster.start())
    real_add_link = state.state.add_link
    rotate = [False]

    async def add_link_then_hear_a_hint(*args):
        epoch = await real_add_link(*args)
        if rotate[0]:  # committed by another relay, which publishes the hint
            await state.db.execute("UPDATE resources SET generation = generation + 1 WHERE id = ?", db["id"])
        cluster.on_event({"kind": "rotated", "hint": True})
        return epoch

    state.state.add_link = add_link_then_hear_a_hint
    try:
        accepted = FakeSession(customer["id"], {db["id"]: "db"})
        state.run(cluster.admit(accepted))  # a forged hint: nothing changed
        assert registry.deleted == [] and all(generation == 0 for _, generation in registry.dropped)
        rotate[0] = True
        with pytest.raises(AuthError) as info:
            state.run(cluster.admit(FakeSession(customer["id"], {db["id"]: "db"})))
        assert info.value.code == "revoked" and (db["id"], 1) in registry.dropped
    finally:
        state.state.add_link = real_add_link
        state.run(cluster.stop())


def test_admitting_after_the_relay_was_taken_for_gone_and_after_a_deletion(state):
    from tunnel.wire.errors import AuthError

    customer = state.create_customer("acme")
    db = state.get_or_create_resource(customer["id"], "db", lambda taken: 21000)
    registry = RecordingRegistry([db["id"]])
    cluster = Cluster(state.state, registry, "wss://127.0.0.1:8443", FAST)
    state.run(cluster.start())
    try:
        # The other relays expired this one (it was slow or cut off): hearing it, it joins again.
        state.expire_relays(-3600.0)
        async def rejoined():
            return [r["id"] for r in await state.state.list_relays()] == [cluster.relay_id]

        state.run(async_wait_until(rejoined, 10, "the relay to join again"))
        # Its row gone without it hearing so: it joins again to record a link.
        state.run(state.db.execute("DELETE FROM relays WHERE id = ?", cluster.relay_id))
        assert state.list_relays() == []
        session = FakeSession(customer["id"], {db["id"]: "db"})
        state.run(cluster.admit(session))
        assert [r["id"] for r in state.list_relays()] == [cluster.relay_id]
        assert [link["epoch"] for link in state.list_links()] == [session.epoch]
        # A registration whose resource was deleted meanwhile is refused, and its endpoint,
        # possibly bound after the deletion was heard, is closed.
        state.delete_resource(db["id"])
        registry.deleted.clear()
        registry.endpoints[db["id"]] = None
        with pytest.raises(AuthError) as info:
            state.run(cluster.admit(FakeSession(customer["id"], {db["id"]: "db"})))
        assert info.value.code == "deleted" and registry.deleted == [db["id"]]
    finally:
        state.run(cluster.stop())


class RecordingRegistry:
    """The registry as the cluster uses it, recording what it is told."""

    def __init__(self, resource_ids) -> None:
        self.endpoints = {rid: None for rid in resource_ids}
        self.agents: set = set()
        self.dropped: list[tuple[str, int]] = []
        self.deleted: list[str] = []

    def drop_agents(self, resource_id: str, below_generation: int) -> int:
        self.dropped.append((resource_id, below_generation))
        return 0

    def resource_deleted(self, resource_id: str) -> None:
        self.deleted.append(resource_id)
        self.endpoints.pop(resource_id, None)


def test_revocations_missed_while_cut_off_are_applied_on_reconnect(tmp_path, postgres_server, postgres_url):
    """Relay B loses the database (and so the notifications) while relay A rotates one resource
    and deletes another; when B gets the database back it must apply both."""
    proxy = TcpProxy((postgres_server.host, postgres_server.port))
    via_proxy = postgres_url.replace(f":{postgres_server.port}/", f":{proxy.port}/")

    async def go():
        a = await RelayState.open(tmp_path / "a", postgres_url, FAST)
        b = await RelayState.open(tmp_path / "b", via_proxy, FAST)
        customer = await a.create_customer("acme")
        db = await a.get_or_create_resource(customer["id"], "db", lambda taken: 21000)
        api = await a.get_or_create_resource(customer["id"], "api", lambda taken: 21001)
        registry = RecordingRegistry([db["id"], api["id"]])
        cluster = Cluster(b, registry, "wss://127.0.0.2:8443", FAST)
        await cluster.start()
        try:
            proxy.cut()
            await async_wait_until(lambda: not b.available, 10, "B to notice the cut")
            await a.rotate_resource(db["id"])
            await a.delete_resource(api["id"])
            await asyncio.sleep(0.3)
            assert registry.dropped == [] and registry.deleted == []  # B heard nothing
            proxy.restore()
            await async_wait_until(lambda: registry.deleted and registry.dropped, 20, "B to catch up")
            assert (db["id"], 1) in registry.dropped and registry.deleted == [api["id"]]
            assert cluster.relay_id in {r["id"] for r in await a.list_relays()}
        finally:
            await cluster.stop()
            await b.close()
            await a.close()

    try:
        run(go())
    finally:
        proxy.close()


def test_holders_put_serving_relays_first_then_the_newest_link(state):
    """Forwarding asks which relays hold an agent of a resource: relays not draining first,
    then the newest link's epoch first, and never a relay silent past the member TTL."""
    customer = state.create_customer("acme")
    db = state.get_or_create_resource(customer["id"], "db", lambda taken: 21000)
    for relay_id in ("rly_a", "rly_b", "rly_c", "rly_d"):
        state.join_relay(relay_id, f"wss://{relay_id}:8443", "0.1.0", f"{relay_id}:9443")
    epochs = {}
    for n, relay_id in enumerate(("rly_a", "rly_b", "rly_c", "rly_d")):
        epochs[relay_id] = state.add_link(link_row(customer["id"], instance=f"inst{n}", relay_id=relay_id,
                                                   agent_id=f"agt_{n}"), [db["id"]], 0)
    state.set_draining("rly_d")  # the newest link, but its relay drains
    # rly_a falls silent: its rows stay until it expires, and never count meanwhile.
    state.run(state.db.execute("UPDATE relays SET heartbeat_at = heartbeat_at - 100 WHERE id = 'rly_a'"))
    holders = state.holders(db["id"], 30.0)
    assert [(h["relay_id"], h["draining"], h["epoch"]) for h in holders] == [
        ("rly_c", False, epochs["rly_c"]), ("rly_b", False, epochs["rly_b"]), ("rly_d", True, epochs["rly_d"])]
    assert holders[0]["peer_address"] == "rly_c:9443"
    assert state.link_counts(30.0) == {db["id"]: 3}
    # A slot that moved: its newer link replaces the row, and the old relay no longer holds it.
    state.add_link(link_row(customer["id"], instance="inst1", relay_id="rly_c", agent_id="agt_moved"), [db["id"]], 0)
    assert [h["relay_id"] for h in state.holders(db["id"], 30.0)] == ["rly_c", "rly_d"]


# --------------------------------------------------------------------------- customer names


def test_ten_concurrent_creates_of_one_name_make_one_customer(state):
    from relay.state.relay_state import NameTaken

    async def create(name):
        try:
            return await state.state.create_customer(name)
        except NameTaken as exc:
            return exc

    async def all_at_once():
        return await asyncio.gather(*[create("acme") for _ in range(10)])

    results = state.run(all_at_once())
    made = [r for r in results if isinstance(r, dict)]
    assert len(made) == 1 and all(isinstance(r, NameTaken) and r.existing["id"] == made[0]["id"]
                                  for r in results if r is not made[0])
    assert [c["name"] for c in state.list_customers()] == ["acme"]


def test_look_alikes_of_an_existing_name_are_refused(state):
    from relay.state.relay_state import NameTaken

    acme = state.create_customer("acme")
    for name in ("\u0430cme", "acm\uff45", "ACME", " acme ", "\uff21\uff23\uff2d\uff25", "a\u0441m\u0435"):
        with pytest.raises(NameTaken) as info:
            state.create_customer(name)
        assert info.value.existing["id"] == acme["id"], name
    for name in ("acmé", "acme2", "ac me"):  # different names stay possible
        state.create_customer(name)
    with pytest.raises(NameTaken):
        state.create_customer("ac  me")


def test_names_made_before_the_unique_key_are_keyed_when_the_relay_opens(tmp_path):
    """A relay.db of schema version 4 holding two customers of one name (the race this key
    closes): both stay, the first gets the key, and a third is refused."""
    import asyncio as _asyncio

    from relay.state.relay_state import NameTaken

    async def go():
        st = await RelayState.open(tmp_path)
        await st.db.execute("UPDATE customers SET name_key = NULL")
        await st.db.execute("DROP INDEX customers_by_name_key")
        await st.db.execute("ALTER TABLE customers DROP COLUMN name_key")
        await st.db.execute("ALTER TABLE resources DROP COLUMN allow_cidrs")  # step 6, after this one
        await st.db.execute("DROP TABLE agent_certificates")  # step 7
        await st.db.execute("DROP TABLE revoked_agents")
        await st.db.execute("ALTER TABLE agent_links DROP COLUMN cert_serial")
        for cid in ("cus_a", "cus_b"):
            await st.db.execute("INSERT INTO customers (id, name, created_at) VALUES (?, 'acme', 'x')", cid)
        await st.close()
        db = sqlite3.connect(tmp_path / "relay.db")
        db.execute("PRAGMA user_version = 4")
        db.execute("DELETE FROM schema_migrations WHERE version >= 5")
        db.commit()
        db.close()
        st = await RelayState.open(tmp_path)
        try:
            keys = await st.db.fetch("SELECT id, name_key FROM customers ORDER BY id")
            assert [(r["id"], r["name_key"]) for r in keys] == [("cus_a", "acme"), ("cus_b", None)]
            with pytest.raises(NameTaken):
                await st.create_customer("\u0430cme")
        finally:
            await st.close()

    _asyncio.run(go())
