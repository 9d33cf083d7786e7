"""Three relays sharing one PostgreSQL, on 127.0.0.1, .2 and .3 (one agent port number on
every host, as behind one name), each with a copy of the first one's state directory, as an
operator starts them."""

from __future__ import annotations

import shutil
import socket

import pytest

from relay.control.admin_client import AdminClient
from tests.helpers import wait_until
from tests.helpers.processes import Relay

HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
ENV = {"RELAY_HEARTBEAT_INTERVAL": "1", "RELAY_MEMBER_TTL": "4", "RELAY_DRAIN_TIMEOUT": "4"}
#: What an agent of these relays needs to dial the ones it learns: addresses vouch only for
#: themselves (agent.config.relay_allowed).
AGENT_ENV = {"RELAY_ALLOW_HOSTS": "127.0.0.0/8"}


def aliases_work() -> bool:
    for host in HOSTS:
        with socket.socket() as s:
            try:
                s.bind((host, 0))
            except OSError:
                return False
    return True


def admin(relay: Relay) -> AdminClient:
    return AdminClient.discover(relay.state_dir, timeout=10)


def links_of(relay: Relay, resource_id: str) -> list[dict]:
    """The agent links of ``resource_id`` in the cluster's view (``cluster status``) from ``relay``."""
    return [link for link in admin(relay).cluster_status()["links"] if resource_id in link["resources"]]


def two_holders(relays: list[Relay], resource_id: str) -> tuple[list[dict], list[Relay], Relay]:
    """Wait for one agent's links of ``resource_id`` on two relays; its links, those two relays
    and the third."""
    held = wait_until(lambda: (lambda ls: ls if len({link["relay_id"] for link in ls}) == 2 else None)(
        links_of(relays[0], resource_id)), 30, "the agent's links to two relays")
    ids = {admin(r).cluster_status()["relay_id"]: r for r in relays}
    holders = [ids[link["relay_id"]] for link in held]
    return held, holders, next(r for r in relays if r not in holders)


class Cluster:
    """Three relays sharing a database and a copy of the first one's state directory."""

    def __init__(self, tmp_path, postgres_url: str, command_prefix: list[str] | None = None, **env) -> None:
        self.tmp_path = tmp_path
        #: Prepended to the relays' commands (e.g. another release's, tests.helpers.release).
        self.command_prefix = command_prefix
        self.env = {"RELAY_DATABASE_URL": postgres_url, **ENV, **env}
        self.relays: list[Relay] = []
        self.args: tuple[str, ...] = ()

    def start(self, *args: str) -> "Cluster":
        self.args = args
        first = Relay(self.tmp_path, host=HOSTS[0], state_dir=self.tmp_path / "r1",
                      command_prefix=self.command_prefix).start(*args, **self.env)
        self.relays.append(first)
        for i, host in enumerate(HOSTS[1:], start=2):
            shutil.copytree(first.state_dir, self.tmp_path / f"r{i}", ignore=shutil.ignore_patterns("admin.json"))
            relay = Relay(self.tmp_path, host=host, state_dir=self.tmp_path / f"r{i}",
                          command_prefix=self.command_prefix)
            relay.port = first.port  # one port number on every host, as behind one name
            self.relays.append(relay.start(*args, **self.env))
        return self

    def restart(self, relay: Relay) -> None:
        """Start ``relay`` again (after it stopped) with the options of the first start."""
        relay.start(*self.args, **self.env)

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


