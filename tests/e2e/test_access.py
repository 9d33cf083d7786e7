"""Who may reach an endpoint, with real relay and agent processes: a resource's ``--allow``
list and the relay's ``--service-allow`` default decide which source addresses (127.0.0.x
here) may connect; others are closed at once, counted and logged; a change made on one
relay of a PostgreSQL cluster applies on the other."""

from __future__ import annotations

import json
import shutil
import socket

import pytest

from tests.helpers import wait_until
from tests.helpers.cluster import admin, aliases_work
from tests.helpers.processes import Relay, echoed, free_port
from tests.helpers.prometheus import fetch

pytestmark = pytest.mark.skipif(not aliases_work(), reason="127.0.0.2 and .3 are not loopback addresses here")


def reaches(addr: tuple[str, int], source: str) -> bool:
    """True when a connection from ``source`` echoes through the endpoint at ``addr``; False
    when the relay closes it at once."""
    try:
        with socket.create_connection(addr, timeout=20, source_address=(source, 0)) as s:
            return echoed(s, b"who goes there" * 100)
    except (ConnectionResetError, BrokenPipeError):
        return False


def test_an_endpoint_admits_only_the_sources_allowed(relay, agents, service_factory):
    metrics_port = free_port()
    relay.stop()
    relay.start("--service-allow", "127.0.0.3", RELAY_METRICS_LISTEN=f"127.0.0.1:{metrics_port}")
    service = service_factory("echo")
    customer = relay.create_customer("acme")
    token = relay.jwt("--customer-id", customer)
    created = relay.cli("resources", "create", "--customer-id", customer, "db", "--allow", "127.0.0.2/32,10.0.0.0/8",
                        "--output", "json")
    resource = json.loads(created.stdout)
    assert resource["allow"] == ["127.0.0.2/32", "10.0.0.0/8"]
    agents.start(relay.url, token, "db", service.port, ca_file=relay.ca_file)
    relay.wait_available(customer, "db")
    addr = relay.endpoint(customer, "db")

    assert reaches(addr, "127.0.0.2")
    assert not reaches(addr, "127.0.0.3")  # the relay default does not apply: the resource has its own list
    assert not reaches(addr, "127.0.0.1")

    # Back to the relay's default, then open to all.
    out = relay.cli("resources", "update", resource["id"], "--allow", "default").stdout
    assert out.strip() == f"{resource['id']} allow 127.0.0.3/32 (relay default)"
    assert reaches(addr, "127.0.0.3") and not reaches(addr, "127.0.0.2")
    relay.cli("resources", "update", resource["id"], "--allow", "0.0.0.0/0,::/0")
    assert reaches(addr, "127.0.0.2") and reaches(addr, "127.0.0.1")

    bad = relay.cli("resources", "update", resource["id"], "--allow", "10.0.0.0/33", check=False)
    assert bad.returncode == 1 and "not a CIDR: '10.0.0.0/33'" in bad.stderr
    missing = relay.cli("resources", "update", "res_nope", "--allow", "10.0.0.0/8", check=False)
    assert missing.returncode == 1 and "no such resource" in missing.stderr

    status, body = fetch(f"http://127.0.0.1:{metrics_port}/metrics")
    assert status == 200
    line = (f'tunnel_relay_streams_refused_total{{customer="{customer}",resource="{resource["id"]}",'
            f'reason="not_allowed"}} 3')
    assert line in body.decode()
    log = relay.proc.log()
    # Logged once per interval (a minute), not per connection.
    assert 1 <= log.count("outside its allow list") < 3 and "Traceback" not in log

    unusable = relay.cli("serve", "--service-allow", "nonsense", check=False)
    assert unusable.returncode == 1 and "not a CIDR: 'nonsense'" in unusable.stderr


def test_a_change_on_one_relay_applies_on_the_other(tmp_path, postgres_url, agents, service_factory):
    env = {"RELAY_DATABASE_URL": postgres_url, "RELAY_HEARTBEAT_INTERVAL": "1", "RELAY_MEMBER_TTL": "5"}
    first = Relay(tmp_path, host="127.0.0.1", state_dir=tmp_path / "first").start(**env)
    second = None
    try:
        customer = first.create_customer("acme")
        token = first.jwt("--customer-id", customer)
        shutil.copytree(first.state_dir, tmp_path / "second", ignore=shutil.ignore_patterns("admin.json"))
        second = Relay(tmp_path, host="127.0.0.2", state_dir=tmp_path / "second").start(**env)
        rid = first.cli("resources", "create", "--customer-id", customer, "db", "--allow", "127.0.0.5").stdout.split()[0]
        service = service_factory("echo")
        agents.start(first.url, token, "db", service.port, ca_file=first.ca_file, RELAY_LINKS="1")
        first.wait_available(customer, "db")
        # The worker reaches the second relay's endpoint, which forwards to the first one's agent.
        _, port = second.endpoint(customer, "db")
        addr = ("127.0.0.2", port)
        wait_until(lambda: reaches(addr, "127.0.0.5"), 20, "the second relay's endpoint to serve")
        assert not reaches(addr, "127.0.0.6")

        first.cli("resources", "update", rid, "--allow", "127.0.0.6/32")
        wait_until(lambda: reaches(addr, "127.0.0.6"), 5, "the change to reach the second relay")
        assert not reaches(addr, "127.0.0.5")
        assert json.loads(second.cli("resources", "list", "--output", "json").stdout)[0]["allow"] == ["127.0.0.6/32"]
        for relay in (first, second):
            assert "Traceback" not in relay.proc.log()
    finally:
        if second is not None:
            second.stop()
        first.stop()
