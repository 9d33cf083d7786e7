"""Endpoint ports an operator can write firewall rules for: ``serve --port-range`` for new
resources, ``resources create --port`` for one resource; and customer names that stay unique."""

from __future__ import annotations

import socket

from tests.helpers import wait_until
from tests.helpers.processes import free_port, free_port_range


def test_port_range_and_a_fixed_port(relay, agents, service_factory):
    relay.stop()
    low, _ = free_port_range(10)
    relay.start("--port-range", f"{low}-{low + 9}")
    service = service_factory("echo")
    customer = relay.create_customer("acme")
    token = relay.jwt("--customer-id", customer)
    outside = relay.cli("resources", "create", "--customer-id", customer, "pinned", "--port", str(low + 10),
                        check=False)
    assert outside.returncode == 1 and "HTTP 400" in outside.stderr, outside.stderr
    assert f"port {low + 10} is outside the relay's --port-range {low}-{low + 9}" in outside.stderr
    fixed = low + 9
    created = relay.cli("resources", "create", "--customer-id", customer, "pinned", "--port", str(fixed))
    rid, endpoint = created.stdout.split()
    assert endpoint == f"127.0.0.1:{fixed}"
    # Bound at once, before any agent: a worker's connection waits for one there.
    with socket.create_connection(("127.0.0.1", fixed), timeout=10):
        pass
    for name in ("pinned", "ranged"):
        agents.start(f"wss://127.0.0.1:{relay.port}", token, name, service.port, ca_file=relay.ca_file)
    relay.wait_available(customer, "pinned")
    relay.wait_available(customer, "ranged")
    assert relay.resource(customer, "pinned")["id"] == rid
    assert relay.endpoint(customer, "pinned")[1] == fixed
    assert low <= relay.endpoint(customer, "ranged")[1] <= low + 9
    with socket.create_connection(("127.0.0.1", fixed), timeout=10) as s:
        s.sendall(b"ping")
        s.shutdown(socket.SHUT_WR)
        assert s.recv(16) == b"ping"
    taken = relay.cli("resources", "create", "--customer-id", customer, "again", "--port", str(fixed), check=False)
    assert taken.returncode == 1 and "HTTP 409" in taken.stderr and "endpoint of another resource" in taken.stderr
    twice = relay.cli("customers", "create", "ACME", check=False)
    assert twice.returncode == 1 and f"a customer named 'acme' exists already ({customer})" in twice.stderr
    bad = relay.cli("serve", "--port-range", "9-1", check=False)
    assert bad.returncode == 1 and "bad port range '9-1'" in bad.stderr


def test_an_endpoint_on_the_metrics_port_never_stops_the_relay(relay):
    """A resource's port later given to the relay's own --metrics-listen (issue 20, item 8): the
    relay binds its own listeners first, starts and serves; the endpoint is logged once and
    shown as not served here."""
    import json
    import urllib.request

    relay.stop()
    port = free_port()
    low = port - 3
    relay.start("--port-range", f"{low}-{low + 9}")
    customer = relay.create_customer("acme")
    relay.cli("resources", "create", "--customer-id", customer, "pinned", "--port", str(port))
    relay.stop()
    relay.start("--port-range", f"{low}-{low + 9}", "--metrics-listen", f"127.0.0.1:{port}")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/live", timeout=10) as answer:
        assert answer.status == 200
    listed = json.loads(relay.cli("resources", "list", "--output", "json").stdout)
    assert len(listed) == 1 and "cannot bind" in listed[0]["endpoint_error"], listed
    assert relay.proc.log().count("endpoint not served on this relay") == 1
    assert relay.proc.alive()


def test_an_endpoint_port_taken_by_another_process_is_a_clear_refusal(relay, agents, service_factory):
    """A resource's port held by an unrelated process on the relay's host (as a client's
    ephemeral port inside --port-range can be): the agent is told why and retries, the relay
    logs one line, no traceback; once the port is free the agent registers."""
    port = free_port()
    span = ("--port-range", f"{port - 3}-{port + 6}")  # fixed ports stay within the range
    relay.stop()
    relay.start(*span)
    customer = relay.create_customer("acme")
    token = relay.jwt("--customer-id", customer)
    relay.cli("resources", "create", "--customer-id", customer, "db", "--port", str(port))
    relay.stop()
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", port))
    squatter.listen(1)
    try:
        relay.start(*span)
        agent = agents.start(f"wss://127.0.0.1:{relay.port}", token, "db", service_factory("echo").port,
                             ca_file=relay.ca_file)
        wait_until(lambda: "cannot listen on its endpoint" in agent.log(), 30, "the agent to be told why")
        assert f"127.0.0.1:{port}" in agent.log() and agent.alive()
        assert "cannot listen on its endpoint" in relay.proc.log()
    finally:
        squatter.close()
    relay.wait_available(customer, "db", timeout=60)
    assert "Traceback" not in relay.proc.log() + agent.log()
