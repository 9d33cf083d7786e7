"""Three relays on one PostgreSQL (127.0.0.1, .2, .3), as real processes: forwarding between
relays, agents linked to several relays, drain, rotation and a relay killed."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import threading
import time

import pytest

from relay.admin_client import AdminClient
from tests.helpers import wait_until
from tests.helpers.processes import Relay, connect, recv_all

HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
ENV = {"RELAY_HEARTBEAT_INTERVAL": "1", "RELAY_MEMBER_TTL": "4"}


def _aliases_work() -> bool:
    for host in HOSTS:
        with socket.socket() as s:
            try:
                s.bind((host, 0))
            except OSError:
                return False
    return True


pytestmark = pytest.mark.skipif(not _aliases_work(), reason="127.0.0.2/.3 are not loopback addresses here")


def admin(relay: Relay) -> AdminClient:
    return AdminClient.discover(relay.state_dir, timeout=10)


class Cluster:
    """Three relays sharing a database and a copy of the first one's state directory."""

    def __init__(self, tmp_path, postgres_url: str, **env) -> None:
        self.tmp_path = tmp_path
        self.env = {"RELAY_DATABASE_URL": postgres_url, **ENV, **env}
        self.relays: list[Relay] = []

    def start(self, *args: str) -> "Cluster":
        first = Relay(self.tmp_path, host=HOSTS[0], state_dir=self.tmp_path / "r1").start(*args, **self.env)
        self.relays.append(first)
        for i, host in enumerate(HOSTS[1:], start=2):
            shutil.copytree(first.state_dir, self.tmp_path / f"r{i}", ignore=shutil.ignore_patterns("admin.json"))
            relay = Relay(self.tmp_path, host=host, state_dir=self.tmp_path / f"r{i}")
            relay.port = first.port  # one port number on every host, as behind one name
            self.relays.append(relay.start(*args, **self.env))
        return self

    def restart(self, relay: Relay, *args: str) -> None:
        relay.start(*args, **self.env)

    def stop(self) -> None:
        for relay in self.relays:
            relay.stop()

    @property
    def ca_file(self) -> str:
        return self.relays[0].ca_file

    def urls(self, *indexes: int) -> str:
        return ",".join(self.relays[i].url for i in indexes)


@pytest.fixture
def cluster(tmp_path, postgres_url):
    made = []

    def start(*args: str, **env) -> Cluster:
        c = Cluster(tmp_path, postgres_url, **env)
        made.append(c)
        return c.start(*args)

    yield start
    for c in made:
        c.stop()


def roundtrip(addr: tuple[str, int], payload: bytes) -> bytes:
    """Send ``payload``, half-close, read everything back (a drain-then-echo service)."""
    with connect(addr) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        return recv_all(s)


def test_exact_bytes_through_every_relay(cluster, agents, service_factory):
    c = cluster()
    r1, r2, r3 = c.relays
    customer = r1.create_customer("acme")
    token = r1.jwt("--customer-id", customer)
    service = service_factory("drain-then-echo")
    # One agent linked to the second relay only.
    agents.start(r2.url, token, "db", service.port, ca_file=c.ca_file, RELAY_LINKS="1")
    resource = r2.wait_available(customer, "db")
    port = int(resource["endpoint"].rsplit(":", 1)[1])
    payload = os.urandom(3 * 1024 * 1024)
    for host in HOSTS:
        wait_until(lambda: r1.resource(customer, "db")["status"] == "AVAILABLE", 10, "the resource available")
        assert roundtrip((host, port), payload) == payload, f"bytes through {host}"
    for relay in c.relays:
        assert "Traceback" not in relay.proc.log()
