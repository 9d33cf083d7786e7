"""The audit log with real relay and agent processes: one JSON line per worker connection
with its exact byte counts, refused connections included; SIGHUP after a rename (as
logrotate's ``create`` mode does) reopens the file."""

from __future__ import annotations

import json
import os
import signal
import socket

from tests.helpers import wait_until
from tests.helpers.cluster import aliases_work
from tests.helpers.processes import connect, recv_all


def lines(path) -> list[dict]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines()]


def test_every_connection_leaves_one_line_with_exact_bytes(relay, agents, service_factory, tmp_path):
    audit = tmp_path / "audit.log"
    relay.stop()
    relay.start("--audit-log", str(audit))
    service = service_factory("echo")
    customer = relay.create_customer("acme")
    token = relay.jwt("--customer-id", customer)
    agents.start(relay.url, token, "orders-db", service.port, ca_file=relay.ca_file)
    resource = relay.wait_available(customer, "orders-db")
    addr = relay.endpoint(customer, "orders-db")

    sizes = [0, 1, 1000, 65537, 1 << 20]
    ports = []
    for size in sizes:
        data = os.urandom(size)
        with connect(addr) as s:
            ports.append(s.getsockname()[1])
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            assert recv_all(s) == data
    # A worker that resets its connection mid-stream.
    with connect(addr) as s:
        reset_port = s.getsockname()[1]
        s.sendall(b"x" * 10)
        assert s.recv(10)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    wait_until(lambda: len(lines(audit)) == len(sizes) + 1, 10, "one audit line per connection")
    records = lines(audit)
    relay_id = json.loads(relay.cli("cluster", "status", "--output", "json").stdout)["relay_id"]
    agent = resource["agents_detail"][0]
    by_port = {int(r["worker"].rpartition(":")[2]): r for r in records}
    for size, port in zip(sizes, ports):
        r = by_port[port]
        assert (r["bytes_to_resource"], r["bytes_from_resource"]) == (size, size)
        assert (r["end"], r["reason"]) == ("closed", "eof")
        assert r["customer"] == customer and r["resource"] == resource["id"] and r["resource_name"] == "orders-db"
        assert r["worker"] == f"127.0.0.1:{port}" and r["relay"] == relay_id
        assert r["agent_instance"] == agent["instance"] and r["agent"] == agent["agent_id"]
        assert r["transport"] == "wss" and r["type"] == "connection"
        assert r["opened"] <= r["closed"] and r["duration_s"] >= 0
    reset = by_port[reset_port]
    assert reset["end"] == "reset" and reset["reason"] == "connection_reset" and reset["bytes_to_resource"] == 10
    assert audit.stat().st_mode & 0o777 == 0o640

    # Rotated by rename, then SIGHUP: new lines go to a new file at the same path.
    if aliases_work():
        relay.cli("resources", "update", resource["id"], "--allow", "127.0.0.1")
    audit.rename(tmp_path / "audit.log.1")
    relay.proc.signal(signal.SIGHUP)
    wait_until(audit.exists, 10, "the relay to reopen the audit log")
    if aliases_work():
        try:
            with socket.create_connection(addr, timeout=10, source_address=("127.0.0.2", 0)) as s:
                s.recv(1)
        except ConnectionResetError:
            pass
        wait_until(lambda: len(lines(audit)) == 1, 10, "the refused connection's line")
        refused = lines(audit)[0]
        assert (refused["end"], refused["reason"], refused["agent"]) == ("refused", "not_allowed", None)
        assert refused["worker"].startswith("127.0.0.2:")
    with connect(addr) as s:
        s.sendall(b"after rotation")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"after rotation"
    wait_until(lambda: any(r["bytes_to_resource"] == 14 for r in lines(audit)), 10, "a line in the new file")
    assert len(lines(tmp_path / "audit.log.1")) == len(sizes) + 1
    assert relay.proc.alive() and "Traceback" not in relay.proc.log()
