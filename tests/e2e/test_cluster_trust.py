"""The cluster's events seen by another role of the same PostgreSQL: a role with no grant at
all can still connect (PUBLIC's default) and LISTEN/NOTIFY on ``tunnel_relay``. What it hears
names no resource, customer, port or relay; what it sends changes nothing (the relays re-read
the tables under their own role); and ``tunnel-relay serve`` says, in one line, that PUBLIC
can connect."""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import threading

import asyncpg

from relay.state.relay_state import RelayState
from tests.helpers import wait_until
from tests.helpers.processes import Relay, connect, free_port


class Eavesdropper:
    """A role with no grants, LISTENing on the relays' channel in a thread of its own."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.heard: list[str] = []
        self.ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._run(),), daemon=True)
        self._thread.start()
        assert self.ready.wait(20), "the unprivileged role could not LISTEN"

    async def _run(self) -> None:
        self._stop = asyncio.Event()
        conn = await asyncpg.connect(self.url, timeout=10)
        try:
            await conn.add_listener("tunnel_relay", lambda c, pid, channel, payload: self.heard.append(payload))
            self.ready.set()
            await self._stop.wait()
        finally:
            await conn.close()

    def notify(self, payload: dict) -> None:
        async def send():
            conn = await asyncpg.connect(self.url, timeout=10)
            try:
                await conn.execute("SELECT pg_notify('tunnel_relay', $1)", json.dumps(payload))
            finally:
                await conn.close()

        asyncio.run_coroutine_threadsafe(send(), self._loop).result(20)

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(20)
        self._loop.close()


def listening(host: str, port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) == 0


def exchange(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(65536)
        assert chunk, "the stream closed"
        got += chunk
    assert got == data


def test_another_database_role_can_neither_forge_nor_overhear_cluster_events(tmp_path, postgres_server,
                                                                             postgres_url, agents, service_factory):
    database = postgres_url.rsplit("/", 1)[1]
    role, password = "mallory_" + secrets.token_hex(4), secrets.token_hex(12)
    postgres_server.psql(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
    mallory_url = f"postgresql://{role}:{password}@{postgres_server.host}:{postgres_server.port}/{database}"
    relay = None
    eavesdropper = None
    try:
        eavesdropper = Eavesdropper(mallory_url)
        relay = Relay(tmp_path, state_dir=tmp_path / "r1").start(
            RELAY_DATABASE_URL=postgres_url, RELAY_HEARTBEAT_INTERVAL="1", RELAY_MEMBER_TTL="5")
        warnings = [line for line in relay.proc.log().splitlines() if "FROM PUBLIC" in line]
        assert len(warnings) == 1 and "every database role may connect" in warnings[0]

        customer = relay.create_customer("acme")
        service = service_factory("echo")
        agent = agents.start(relay.url, relay.jwt("--customer-id", customer), "db", service.port,
                             ca_file=relay.ca_file, RELAY_LINKS="1")
        resource = relay.wait_available(customer, "db")
        host, port = relay.endpoint(customer, "db")

        # Forged: a rotation and a deletion of the agent's resource, a resource on port 22.
        ssh_before = listening(host, 22)
        forged = [{"kind": "rotated", "resource_id": resource["id"], "generation": 99},
                  {"kind": "deleted", "resource_id": resource["id"]},
                  {"kind": "resource_created", "resource": {
                      "id": "res_forged0000000000", "customer_id": customer, "name": "ssh", "port": 22,
                      "generation": 0, "created_at": "2026-01-01T00:00:00Z"}},
                  {"kind": "relay_left", "relay_id": "rly_x", "expired": True}]
        for event in forged:
            eavesdropper.notify(event)

        # Then a real change from another relay (another process on the same database, same
        # role): once this relay has bound its endpoint it has handled every event before it.
        async def create_elsewhere():
            other = await RelayState.open(tmp_path / "r2", postgres_url)
            try:
                return await other.get_or_create_resource(customer, "other", lambda taken: free_port())
            finally:
                await other.close()

        created = asyncio.run(create_elsewhere())
        wait_until(lambda: listening(host, created["port"]), 20, "the relay to bind the resource made elsewhere")

        assert agent.alive(), agent.log()[-2000:]
        assert relay.resource(customer, "db")["agents"] == 1
        with connect((host, port)) as worker:
            exchange(worker, b"still served" * 1000)
        assert listening(host, 22) == ssh_before
        assert "res_forged" not in relay.proc.log()

        # Overheard: kinds of change, never an id, a name, a port or a customer.
        assert eavesdropper.heard, "the role heard nothing at all: the test did not run"
        secrets_seen = [resource["id"], created["id"], customer, "acme", '"db"', "other", str(port),
                        str(created["port"]), relay.url]
        for payload in eavesdropper.heard:
            event = json.loads(payload)
            if event in forged:
                continue  # what it sent itself
            assert set(event) <= {"kind", "origin"}, payload
            assert not any(s in payload for s in secrets_seen), payload
        assert "Traceback" not in relay.proc.log()
    finally:
        if relay is not None:
            relay.stop()
        if eavesdropper is not None:
            eavesdropper.close()
        postgres_server.psql(f"DROP ROLE IF EXISTS {role}")


def test_no_warning_once_public_cannot_connect(tmp_path, postgres_server, postgres_url):
    database = postgres_url.rsplit("/", 1)[1]

    async def check() -> tuple[bool, bool]:
        state = await RelayState.open(tmp_path, postgres_url)
        try:
            before = await state.public_can_connect()
            postgres_server.psql(f'REVOKE CONNECT ON DATABASE "{database}" FROM PUBLIC')
            return before, await state.public_can_connect()
        finally:
            await state.close()

    assert asyncio.run(check()) == (True, False)
