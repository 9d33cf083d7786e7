"""relay.state.relay_state: customers, resources and tokens, the same contract on both back ends (SQLite
and a real PostgreSQL: every test taking ``state`` runs on each); port allocation; files."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import sqlite3
import stat

import pytest

from relay.state.relay_state import (
    ORG_CUSTOMER_ID,
    SCHEMA_VERSION,
    RelayState,
    allocate_port,
    ensure_state_dir,
    new_id,
    write_private,
)
from relay.state.store.errors import Conflict, SchemaTooNew
from tests.helpers.sync_state import new_loop


def open_and_close(directory, url=None) -> None:
    async def go():
        st = await RelayState.open(directory, url)
        await st.close()

    asyncio.run(go())


def counter_allocator(start: int = 21000):
    """A deterministic allocator: the lowest port from ``start`` not taken."""

    def allocate(taken: set[int]) -> int:
        port = start
        while port in taken:
            port += 1
        return port

    return allocate


def test_ids_have_the_documented_shape():
    for _ in range(50):
        assert re.fullmatch(r"cus_[a-z2-7]{16}", new_id("cus"))
        assert re.fullmatch(r"res_[a-z2-7]{16}", new_id("res"))


def test_database_file_schema_version_and_modes(tmp_path):
    directory = tmp_path / "state"
    open_and_close(directory)
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    db = directory / "relay.db"
    assert stat.S_IMODE(os.stat(db).st_mode) == 0o600
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        con.close()


def test_refuses_a_newer_schema(tmp_path):
    directory = tmp_path / "state"
    open_and_close(directory)
    con = sqlite3.connect(directory / "relay.db")
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.close()
    with pytest.raises(SchemaTooNew, match="newer than this relay"):
        open_and_close(directory)


def test_customers(state):
    a = state.create_customer("Acme Corp")
    b = state.create_customer("Globex")
    assert set(a) == {"id", "name", "created_at"}
    assert a["name"] == "Acme Corp"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", a["created_at"])
    assert state.get_customer(a["id"]) == a
    assert state.get_customer("cus_aaaaaaaaaaaaaaaa") is None
    assert [c["id"] for c in state.list_customers()] == [a["id"], b["id"]]


@pytest.mark.parametrize("name", ["", "   ", "x" * 201, "bad\nname", None, 5])
def test_customer_name_validation(state, name):
    with pytest.raises(ValueError):
        state.create_customer(name)


def test_org_customer_is_created_lazily(state):
    assert [c["id"] for c in state.list_customers()] == []
    org = state.get_customer(ORG_CUSTOMER_ID)
    assert org["id"] == ORG_CUSTOMER_ID and org["name"] == "organization"
    assert state.org_customer() == org
    assert [c["id"] for c in state.list_customers()] == [ORG_CUSTOMER_ID]


def test_resource_created_once_and_port_from_the_callback(state):
    customer = state.create_customer("acme")
    seen = []

    def allocate(taken):
        seen.append(set(taken))
        return 21000 + len(taken)

    db = state.get_or_create_resource(customer["id"], "db", allocate)
    assert db["port"] == 21000 and db["generation"] == 0 and db["customer_id"] == customer["id"]
    assert re.fullmatch(r"res_[a-z2-7]{16}", db["id"])
    again = state.get_or_create_resource(customer["id"], "db", allocate)
    assert again == db
    api = state.get_or_create_resource(customer["id"], "api", allocate)
    assert api["port"] == 21001
    assert seen == [set(), {21000}]
    assert state.get_resource(db["id"]) == db
    assert [r["id"] for r in state.list_resources()] == [db["id"], api["id"]]
    assert state.taken_ports() == {21000, 21001}


def test_same_name_for_two_customers_gets_two_resources(state):
    a = state.create_customer("a")
    b = state.create_customer("b")
    alloc = counter_allocator()
    ra = state.get_or_create_resource(a["id"], "db", alloc)
    rb = state.get_or_create_resource(b["id"], "db", alloc)
    assert ra["id"] != rb["id"] and ra["port"] != rb["port"]
    assert [r["id"] for r in state.list_resources(b["id"])] == [rb["id"]]


def test_allocator_returning_a_taken_port_is_an_error(state):
    a = state.create_customer("a")
    state.get_or_create_resource(a["id"], "one", lambda taken: 21000)
    with pytest.raises(RuntimeError):
        state.get_or_create_resource(a["id"], "two", lambda taken: 21000)


def test_unknown_customer_cannot_own_a_resource(state):
    with pytest.raises(KeyError):
        state.get_or_create_resource("cus_aaaaaaaaaaaaaaaa", "db", counter_allocator())


def test_ports_and_generations_survive_a_reopen(tmp_path, database_url):
    directory = tmp_path / "state"

    async def first():
        async with await RelayState.open(directory, database_url) as st:
            customer = await st.create_customer("acme")
            db = await st.get_or_create_resource(customer["id"], "db", counter_allocator(23456))
            assert await st.rotate_resource(db["id"]) == 1
            return customer, db

    def must_not_allocate(taken):
        raise AssertionError("the port must be kept")

    async def second(customer, db):
        async with await RelayState.open(directory, database_url) as st:
            again = await st.get_or_create_resource(customer["id"], "db", must_not_allocate)
            assert again["id"] == db["id"] and again["port"] == 23456 and again["generation"] == 1
            assert await st.get_customer(customer["id"]) == customer

    loop = new_loop()
    try:
        loop.run_until_complete(second(*loop.run_until_complete(first())))
    finally:
        loop.close()


def test_rotate_and_delete(state):
    customer = state.create_customer("acme")
    db = state.get_or_create_resource(customer["id"], "db", counter_allocator())
    assert state.rotate_resource(db["id"]) == 1
    assert state.rotate_resource(db["id"]) == 2
    assert state.get_resource(db["id"])["generation"] == 2
    with pytest.raises(KeyError):
        state.rotate_resource("res_aaaaaaaaaaaaaaaa")
    assert state.delete_resource(db["id"]) is True
    assert state.delete_resource(db["id"]) is False
    assert state.get_resource(db["id"]) is None
    # The port is free again; the name can be registered anew (a new resource).
    fresh = state.get_or_create_resource(customer["id"], "db", counter_allocator())
    assert fresh["id"] != db["id"] and fresh["generation"] == 0 and fresh["port"] == db["port"]


def test_record_token(state):
    customer = state.create_customer("acme")
    state.record_token("jti-1", customer["id"], None, 0, False, 1000, 2000)
    state.record_token("jti-2", ORG_CUSTOMER_ID, "res_aaaaaaaaaaaaaaaa", 3, True, 1001, 2001)
    tokens = state.list_tokens()
    assert [t["jti"] for t in tokens] == ["jti-1", "jti-2"]
    assert tokens[1]["org_only"] is True and tokens[1]["generation"] == 3
    assert [t["jti"] for t in state.list_tokens("res_aaaaaaaaaaaaaaaa")] == ["jti-2"]
    with pytest.raises(Conflict):
        state.record_token("jti-1", customer["id"], None, 0, False, 1000, 2000)


def test_allocate_port_skips_taken_and_unbindable_ports():
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    busy = blocker.getsockname()[1]
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    free = probe.getsockname()[1]
    probe.close()
    try:
        with pytest.raises(RuntimeError):
            allocate_port("127.0.0.1", set(), (busy, busy))
        low, high = min(busy, free), max(busy, free)
        taken = set(range(low, high + 1)) - {busy, free}
        # Only ``free`` is neither taken by the state nor bound by another socket.
        assert allocate_port("127.0.0.1", taken, (low, high)) == free
    finally:
        blocker.close()


def test_allocate_port_randomises_and_fails_cleanly():
    ports = {allocate_port("127.0.0.1", set()) for _ in range(10)}
    assert all(20000 <= p <= 29999 for p in ports)
    assert len(ports) > 1
    with pytest.raises(RuntimeError, match="no free TCP port"):
        allocate_port("127.0.0.1", {25000, 25001}, (25000, 25001))


def test_state_dir_is_tightened_and_private_writes(tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)
    ensure_state_dir(loose)
    assert stat.S_IMODE(os.stat(loose).st_mode) == 0o700
    target = loose / "secret"
    write_private(target, b"one")
    write_private(target, b"two")
    assert target.read_bytes() == b"two"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    assert [p.name for p in loose.iterdir()] == ["secret"]


# --------------------------------------------------------------------------- schema 2, expiry


def test_migration_from_version_1_gives_existing_resources_a_full_idle_period(tmp_path):
    import time

    from test_store import V1_SCHEMA

    path = tmp_path / "relay.db"
    db = sqlite3.connect(path)
    db.executescript(V1_SCHEMA)
    db.execute("INSERT INTO customers VALUES ('cus_aaaaaaaaaaaaaaaa', 'old', '2020-01-01T00:00:00Z')")
    db.execute("INSERT INTO resources (id, customer_id, name, port, generation, created_at) "
               "VALUES ('res_aaaaaaaaaaaaaaaa', 'cus_aaaaaaaaaaaaaaaa', 'db', 21000, 0, '2020-01-01T00:00:00Z')")
    db.commit()
    db.close()
    before = int(time.time())

    async def go():
        async with await RelayState.open(tmp_path) as st:
            assert await st.db.fetchval("PRAGMA user_version") == SCHEMA_VERSION
            assert (await st.get_resource("res_aaaaaaaaaaaaaaaa"))["name"] == "db"  # the existing methods
            assert await st.idle_resources(before) == []  # served "now" as far as expiry goes
            assert [r["id"] for r in await st.idle_resources(before + 3600)] == ["res_aaaaaaaaaaaaaaaa"]

    asyncio.run(go())


def test_count_mark_and_idle_resources(state):
    customer = state.create_customer("acme")["id"]
    other = state.create_customer("other")["id"]
    alloc = counter_allocator()
    a = state.get_or_create_resource(customer, "a", alloc)
    b = state.get_or_create_resource(customer, "b", alloc)
    pinned = state.get_or_create_resource(customer, "pinned", alloc)
    state.get_or_create_resource(other, "c", alloc)
    assert state.count_resources(customer) == 3 and state.count_resources(other) == 1
    state.record_token("j1", customer, pinned["id"], 0, False, 0, 10)  # named by a token: never idle
    state.mark_served([a["id"]], 2_000_000_000)
    idle = {r["name"] for r in state.idle_resources(1_999_999_999)}
    assert idle == {"b", "c"}  # never served: counted from created_at; a was served later
    assert {r["name"] for r in state.idle_resources(2_000_000_001)} == {"a", "b", "c"}


def test_state_write_failure_tells_a_full_directory_from_a_bug(tmp_path):
    import errno

    from relay.state.relay_state import state_write_failure

    con = sqlite3.connect(tmp_path / "relay.db")
    con.execute("CREATE TABLE filler (x BLOB)")
    pages = con.execute("PRAGMA page_count").fetchone()[0]
    con.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(sqlite3.OperationalError) as full:
        con.execute("INSERT INTO filler VALUES (zeroblob(100000))")
    con.close()
    assert state_write_failure(full.value).startswith("state directory full")
    assert state_write_failure(OSError(errno.ENOSPC, "No space left on device")).startswith("state directory full")
    assert state_write_failure(OSError(errno.EROFS, "Read-only file system")) == "state directory read-only"
    assert state_write_failure(sqlite3.OperationalError("no such table: x")) is None
    assert state_write_failure(KeyError("x")) is None


def test_a_full_sqlite_database_is_a_state_write_failure(tmp_path):
    from relay.state.relay_state import StateWriteFailed

    async def go():
        async with await RelayState.open(tmp_path) as st:
            pages = await st.db.fetchval("PRAGMA page_count")
            await st.db.execute(f"PRAGMA max_page_count = {pages}")
            with pytest.raises(StateWriteFailed, match="^state directory full"):
                for i in range(10000):
                    await st.create_customer(f"{i:05d}" + "x" * 195)  # names are unique
            assert len(await st.list_customers()) > 0  # reads go on

    asyncio.run(go())
