"""Relays sharing one PostgreSQL database, as real processes: ``python -m relay serve`` on
127.0.0.1 and 127.0.0.2 (the second with a copy of the first's state dir), real agents,
a real PostgreSQL started by the session fixture, stopped and restarted under load."""

from __future__ import annotations

import re
import shutil
import socket
import time

import pytest

from relay.control.admin_client import AdminError
from tests.helpers import wait_until
from tests.helpers.cluster import admin, aliases_work
from tests.helpers.processes import Relay, connect


def agents_on(relay: Relay, resource_id: str) -> int:
    return next(r["agents"] for r in admin(relay).list_resources() if r["id"] == resource_id)


def exchange(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(65536)
        assert chunk, "the stream closed"
        got += chunk
    assert got == data


def test_rotate_on_one_relay_drops_the_agent_on_the_other(tmp_path, postgres_url, agents, service_factory):
    if not aliases_work():
        pytest.skip("127.0.0.2 is not a loopback address here")
    env = {"RELAY_DATABASE_URL": postgres_url, "RELAY_HEARTBEAT_INTERVAL": "1", "RELAY_MEMBER_TTL": "5"}
    first = Relay(tmp_path, host="127.0.0.1", state_dir=tmp_path / "first").start(**env)
    try:
        customer = first.create_customer("acme")
        token = first.jwt("--customer-id", customer)
        shutil.copytree(first.state_dir, tmp_path / "second", ignore=shutil.ignore_patterns("admin.json"))
        second = Relay(tmp_path, host="127.0.0.2", state_dir=tmp_path / "second").start(**env)
        try:
            service = service_factory("echo")
            agent = agents.start(second.url, token, "db", service.port, ca_file=str(second.state_dir / "ca.pem"),
                                 RELAY_LINKS="1")
            resource = second.wait_available(customer, "db")
            host, port = second.endpoint(customer, "db")
            assert host == "127.0.0.2"
            with connect((host, port)) as worker:
                exchange(worker, b"through the second relay" * 1000)

            # The first relay sees the agent link and where it is.
            status = admin(first).cluster_status()
            relays = {r["id"]: r for r in status["relays"]}
            assert len(relays) == 2 and sum(r["self"] for r in relays.values()) == 1
            link = next(l for l in status["links"] if resource["id"] in l["resources"])
            assert relays[link["relay_id"]]["advertise_url"] == second.url and not relays[link["relay_id"]]["self"]
            detail = next(r for r in admin(first).list_resources(extended=True) if r["id"] == resource["id"])
            assert [(a["relay_id"], a["relay_url"]) for a in detail["agents_detail"]] == [(link["relay_id"],
                                                                                           second.url)]
            table = first.cli("cluster", "status").stdout
            assert second.url in table and "(this relay)" in table and link["agent_id"] in table

            # Rotation on the first relay drops the agent on the second within 2 s.
            admin(first).registration_jwt(customer, resource_id=resource["id"], rotate=True)
            rotated = time.monotonic()
            wait_until(lambda: agents_on(second, resource["id"]) == 0, 2.0, "the second relay to drop the agent")
            assert time.monotonic() - rotated < 2.0
            wait_until(lambda: not agent.alive(), 10, "the revoked agent to stop")
            assert "revoked" in agent.log()
            for relay in (first, second):
                assert "Traceback" not in relay.proc.log()
            # Killed, the second relay stops heartbeating: the first removes it within the TTL.
            second.proc.kill()
            wait_until(lambda: len(admin(first).cluster_status()["relays"]) == 1, 15, "the dead relay to expire")
            assert "stopped heartbeating" in first.proc.log()
        finally:
            second.stop()
    finally:
        first.stop()


def test_database_stopped_and_restarted_under_a_connected_agent(tmp_path, postgres_server, postgres_url, agents,
                                                               service_factory):
    env = {"RELAY_DATABASE_URL": postgres_url, "RELAY_DB_RECONNECT_MAX": "1", "RELAY_HEARTBEAT_INTERVAL": "1",
           "RELAY_MEMBER_TTL": "5", "RELAY_OUTAGE_LOG_INTERVAL": "60"}
    relay = Relay(tmp_path).start(**env)
    try:
        customer = relay.create_customer("acme")
        token = relay.jwt("--customer-id", customer)
        service = service_factory("echo")
        agents.start(relay.url, token, "db", service.port, ca_file=relay.ca_file)
        resource = relay.wait_available(customer, "db")
        endpoint = relay.endpoint(customer, "db")
        with connect(endpoint) as worker:
            exchange(worker, b"before" * 10000)
            postgres_server.stop()
            try:
                # Streams keep flowing, old and new.
                exchange(worker, b"during" * 10000)
                with connect(endpoint) as second_worker:
                    exchange(second_worker, b"a new stream during the outage" * 1000)
                # A new registration is refused clearly, and the agent keeps trying.
                late = agents.start(relay.url, token, "db", service.port, ca_file=relay.ca_file)
                wait_until(lambda: "state database unreachable" in late.log(), 20, "the late agent to be refused")
                assert late.alive()
                # Admin calls that need the database: a clear 503 each, and no log line each.
                for _ in range(30):
                    with pytest.raises(AdminError, match="HTTP 503: state database unreachable"):
                        admin(relay).list_customers()
                assert admin(relay).health() == {"status": "ok"}
                out = relay.cli("customers", "list", check=False)
                assert out.returncode == 1 and "state database unreachable" in out.stderr
            finally:
                postgres_server.start()
            # Back: the late agent registers, admin calls work, the first stream still flows.
            wait_until(lambda: agents_on(relay, resource["id"]) == 2, 60, "the late agent to register")
            exchange(worker, b"after" * 10000)
        assert [c["id"] for c in admin(relay).list_customers()] == [customer]
        log = relay.proc.log()
        assert "Traceback" not in log
        unreachable = [line for line in log.splitlines() if re.search(r"unreachable", line)]
        # One line when it went, at most a few summaries, one when it came back.
        assert 2 <= len(unreachable) <= 6, "\n".join(unreachable)
        assert any("reachable again" in line for line in log.splitlines())
        assert postgres_server.password not in log
    finally:
        relay.stop()
    # A clean stop removes the relay's row (and its agent links) at once.
    assert postgres_server.psql("SELECT count(*) FROM relays", postgres_url.rsplit("/", 1)[1]) == "0"
