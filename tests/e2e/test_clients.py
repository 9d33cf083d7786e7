"""Real clients through the tunnel (psql/pgbench against PostgreSQL, redis-benchmark against
Redis), and a real nginx terminating TLS in front of the relay. Servers come from Debian's
packages (installed by scripts/setup.sh) and are started here on private loopback ports."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess

import pytest

from tests.helpers.nginx import nginx_available, start_nginx
from tests.helpers.processes import connect, free_port, recv_all, wait_until


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def redis():
    if not shutil.which("redis-server") or not shutil.which("redis-benchmark"):
        pytest.skip("Redis is not installed (scripts/setup.sh installs it)")
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--protected-mode", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _port_open(port), 20, "redis-server")
        yield port
    finally:
        proc.kill()
        proc.wait(10)


def _register(relay, agents, port: int, transport: str, name: str):
    customer = relay.create_customer("acme")
    agents.start(f"{transport}://127.0.0.1:{relay.port}", relay.jwt("--customer-id", customer), name, port,
                 ca_file=relay.ca_file)
    relay.wait_available(customer, name)
    return relay.endpoint(customer, name)


def test_psql_and_pgbench_through_the_tunnel(relay, agents, postgres, transport):
    host, port = _register(relay, agents, postgres, transport, "orders-db")
    env = dict(os.environ, PGHOST=host, PGPORT=str(port), PGUSER="postgres", PGCONNECT_TIMEOUT="20")
    out = subprocess.run(["psql", "-XAtq", "-d", "postgres", "-c",
                          "select repeat('x', 1000000) = repeat('x', 1000000), sum(g) from generate_series(1, 100000) g"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "t|5000050000"
    out = subprocess.run(["pgbench", "-i", "-q", "-s", "1", "postgres"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    out = subprocess.run(["pgbench", "-n", "-c", "8", "-j", "2", "-t", "100", "postgres"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "number of transactions actually processed: 800/800" in out.stdout
    assert "number of failed transactions: 0" in out.stdout


def test_redis_benchmark_through_the_tunnel(relay, agents, redis, transport):
    host, port = _register(relay, agents, redis, transport, "cache")
    value = os.urandom(512 * 1024).hex()  # 1 MiB value, exact round trip
    cli = ["redis-cli", "-h", host, "-p", str(port)]
    assert subprocess.run(cli + ["-x", "SET", "blob"], input=value, capture_output=True, text=True, timeout=60).stdout.strip() == "OK"
    assert subprocess.run(cli + ["GET", "blob"], capture_output=True, text=True, timeout=60).stdout.rstrip("\n") == value
    out = subprocess.run(["redis-benchmark", "-h", host, "-p", str(port), "-n", "20000", "-c", "50", "-P", "4",
                          "-t", "set,get", "-q", "--csv"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rates = dict(re.findall(r'"(SET|GET)","([0-9.]+)"', out.stdout))
    assert set(rates) == {"SET", "GET"}, out.stdout
    assert all(float(r) > 0 for r in rates.values())


@pytest.mark.skipif(not nginx_available(), reason="nginx is not installed (scripts/setup.sh installs it)")
def test_agent_reaches_the_relay_through_nginx_terminating_tls(relay, agents, service_factory):
    service = service_factory("drain-then-echo")
    state = relay.state_dir
    with start_nginx(relay.port, state / "server.pem", state / "server-key.pem", upstream_tls=True,
                     upstream_ca_file=state / "ca.pem", upstream_name="localhost") as nginx:
        customer = relay.create_customer("acme")
        agent = agents.start(f"wss://localhost:{nginx.port}", relay.jwt("--customer-id", customer), "db", service.port,
                             ca_file=relay.ca_file)
        relay.wait_available(customer, "db")
        payload = os.urandom(4 * 1024 * 1024 + 1)
        with connect(relay.endpoint(customer, "db")) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            assert recv_all(s) == payload
        row = relay.resource(customer, "db")
        assert row["agents_detail"][0]["transport"] == "wss"
        assert agent.alive()
