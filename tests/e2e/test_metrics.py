"""Metrics and health end to end: a real relay (``RELAY_METRICS_LISTEN``) and real agents
(``METRICS_LISTEN``) carry real traffic, a real Prometheus scrapes them and its HTTP API must
show the counts; ``promtool check metrics`` lints what they serve, and Prometheus evaluates
every expression of the Grafana dashboard. About 10 s in all (Prometheus starts in a tenth
of a second and scrapes every 0.5 s)."""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import subprocess
from pathlib import Path

import pytest

from tests.helpers.processes import PY, ROOT, _env, connect, free_port, recv_all, wait_until
from tests.helpers.prometheus import Prometheus, fetch, prometheus_available, promtool_check

pytestmark = pytest.mark.skipif(not prometheus_available(),
                                reason="prometheus and promtool are not installed (scripts/setup.sh installs them)")

DASHBOARD = ROOT / "docs" / "grafana-dashboard.json"


@pytest.fixture
def relay_metrics_port() -> int:
    return free_port()


@pytest.fixture
def relay_env(relay_metrics_port):
    return {"RELAY_METRICS_LISTEN": f"127.0.0.1:{relay_metrics_port}",
            "TUNNEL_MAX_RESOURCES_PER_CUSTOMER": "3",
            "TUNNEL_KEEPALIVE_INTERVAL": "0.5"}  # round trips sampled soon


def _echo(addr, size: int) -> bytes:
    data = os.urandom(size)
    with connect(addr) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        return recv_all(s) == data


def _refused(addr) -> bool:
    """A connection the relay resets at once (or once the agent's dial failed)."""
    try:
        with connect(addr) as s:
            s.sendall(b"hello")
            return s.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def test_prometheus_scrapes_relay_and_agents(relay, agents, service_factory, relay_metrics_port, tmp_path):
    customer = relay.create_customer("acme")
    token = relay.jwt("--customer-id", customer)
    wss, quic = f"wss://127.0.0.1:{relay.port}", f"quic://127.0.0.1:{relay.port}"
    service = service_factory("echo")
    ports = {name: free_port() for name in ("db", "dead", "gone")}
    started = {
        "db": agents.start(wss, token, "db", service.port, ca_file=relay.ca_file,
                           METRICS_LISTEN=f"127.0.0.1:{ports['db']}"),
        "dead": agents.start(quic, token, "dead", free_port(), ca_file=relay.ca_file,  # nothing listens there
                             METRICS_LISTEN=f"127.0.0.1:{ports['dead']}"),
        "gone": agents.start(wss, token, "gone", service.port, ca_file=relay.ca_file),
    }
    ids = {name: relay.wait_available(customer, name)["id"] for name in started}

    # Traffic: echoes, dials that fail at the agent, connections to a resource no agent serves.
    sizes = [1000 * (i + 1) + i for i in range(5)]
    assert all(_echo(relay.endpoint(customer, "db"), n) for n in sizes)
    assert all(_refused(relay.endpoint(customer, "dead")) for _ in range(3))
    gone = relay.endpoint(customer, "gone")
    started["gone"].stop()
    wait_until(lambda: relay.resource(customer, "gone")["status"] == "UNAVAILABLE", 20, "gone to be unavailable")
    assert all(_refused(gone) for _ in range(2))
    # Refusals: a fourth resource (over the quota of 3), a bad token, a TLS client that does
    # not trust the relay.
    over_quota = agents.start(wss, token, "extra", service.port, ca_file=relay.ca_file)
    bad_token = agents.start(wss, "not-a-jwt", "db", service.port, ca_file=relay.ca_file)
    with socket.create_connection(("127.0.0.1", relay.port)) as raw, pytest.raises(ssl.SSLCertVerificationError):
        ssl.create_default_context().wrap_socket(raw, server_hostname="127.0.0.1")
    wait_until(lambda: not bad_token.alive(), 20, "the agent with a bad token to give up")
    wait_until(lambda: "quota_exceeded" in over_quota.log(), 20, "the agent over quota to be refused")

    # Health.
    assert fetch(f"http://127.0.0.1:{relay_metrics_port}/ready") == (200, b"ready\n")
    assert fetch(f"http://127.0.0.1:{ports['db']}/ready") == (200, b"ready\n")
    assert fetch(f"http://127.0.0.1:{ports['db']}/live") == (200, b"live\n")

    relay_target, db_agent, dead_agent = (f"127.0.0.1:{p}" for p in (relay_metrics_port, ports["db"], ports["dead"]))
    prometheus = Prometheus(tmp_path, {"relay": [relay_target], "agent": [db_agent, dead_agent]}).start()
    try:
        wait_until(prometheus.targets_up, 30, "Prometheus to scrape every target")
        total = sum(sizes)
        expected = {
            f'tunnel_relay_streams_opened_total{{resource="{ids["db"]}"}}': 5,
            f'tunnel_relay_stream_bytes_total{{resource="{ids["db"]}",direction="to_resource"}}': total,
            f'tunnel_relay_stream_bytes_total{{resource="{ids["db"]}",direction="from_resource"}}': total,
            f'tunnel_relay_streams_active{{resource="{ids["db"]}"}}': 0,
            f'tunnel_relay_streams_failed_total{{resource="{ids["dead"]}",reason="connect_failed"}}': 3,
            # Its agent stopped gracefully: held, then refused with that reason.
            f'tunnel_relay_streams_refused_total{{resource="{ids["gone"]}",reason="deregistered"}}': 2,
            f'tunnel_relay_resource_agents{{resource="{ids["gone"]}"}}': 0,
            f'tunnel_relay_agents_connected{{customer="{customer}",transport="wss"}}': 1,
            f'tunnel_relay_agents_connected{{customer="{customer}",transport="quic"}}': 1,
            f'tunnel_relay_resources{{customer="{customer}"}}': 3,
            f'tunnel_relay_resources_available{{customer="{customer}"}}': 2,
            f'tunnel_agent_link_state{{instance="{db_agent}",state="registered"}}': 1,
            f'tunnel_agent_link_transport{{instance="{db_agent}",transport="wss"}}': 1,
            f'tunnel_agent_link_transport{{instance="{dead_agent}",transport="quic"}}': 1,
            f'tunnel_agent_streams_opened_total{{instance="{db_agent}",resource="db"}}': 5,
            f'tunnel_agent_link_bytes_total{{instance="{db_agent}",direction="sent"}}': total,
            f'tunnel_agent_link_bytes_total{{instance="{db_agent}",direction="received"}}': total,
            f'tunnel_agent_dial_failures_total{{instance="{dead_agent}",resource="dead",reason="refused"}}': 3,
            f'tunnel_agent_reconnects_total{{instance="{db_agent}"}}': 0,
            'min(up)': 1,
            # Names (read again when a scrape finds them 2 s old: they may lag a scrape or two).
            f'tunnel_relay_customer_info{{customer="{customer}",name="acme"}}': 1,
            f'tunnel_relay_resource_info{{resource="{ids["db"]}",name="db",customer="{customer}"}}': 1,
        }
        at_least = {
            'tunnel_relay_auth_failures_total{reason="unauthorized"}': 1,
            'tunnel_relay_auth_failures_total{reason="quota_exceeded"}': 1,
            f'tunnel_relay_quota_hits_total{{customer="{customer}",limit="max_resources_per_customer"}}': 1,
            'tunnel_relay_handshake_failures_total{transport="wss",reason="tls"}': 1,
            'sum(tunnel_relay_link_rtt_seconds_count)': 2,
            f'tunnel_agent_link_rtt_seconds{{instance="{db_agent}"}}': 0,
        }

        wrong: dict = {}

        def all_seen() -> bool:
            wrong.clear()
            for expr, value in expected.items():
                if (got := prometheus.value(expr)) != value:
                    wrong[expr] = got
            for expr, value in at_least.items():
                if (got := prometheus.value(expr)) is None or got < value:
                    wrong[expr] = got
            return not wrong

        try:
            wait_until(all_seen, 30, "Prometheus to show the counts")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; expected otherwise: {wrong}") from None

        # Every expression of the dashboard evaluates, and its metrics have series.
        names = set(prometheus.api("label/__name__/values"))
        for expr in _dashboard_expressions():
            query = expr.replace("$__rate_interval", "1m").replace("$customer", ".*").replace("$resource", ".*")
            prometheus.query(query)  # raises unless Prometheus accepts it
            for name in re.findall(r"\b(?:tunnel|process)_[a-z0-9_]+\b", expr):
                assert name in names, f"{name} (in {expr!r}) has no series"
    finally:
        prometheus.stop()

    # promtool lints what both serve.
    for target in (relay_target, db_agent):
        status, body = fetch(f"http://{target}/metrics")
        assert status == 200 and promtool_check(body) == "", promtool_check(body)


def _dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_agent_ready_only_while_registered(relay, agents, service_factory):
    customer = relay.create_customer("acme")
    token = relay.jwt("--customer-id", customer)
    service = service_factory("echo")
    relay.stop()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    agents.start(f"wss://127.0.0.1:{relay.port}", token, "db", service.port, ca_file=relay.ca_file,
                 METRICS_LISTEN=f"127.0.0.1:{port}")

    def reconnects() -> float:
        found = re.search(rb"^tunnel_agent_reconnects_total\{[^}]*\} (\d+)", fetch(f"{base}/metrics")[1], re.M)
        return float(found.group(1))

    wait_until(lambda: reconnects() >= 1, 20, "the agent to retry")
    assert fetch(f"{base}/live") == (200, b"live\n")
    status, body = fetch(f"{base}/ready")
    assert status == 503 and body.startswith(b"not ready: not registered with the relay"), body
    relay.start()
    wait_until(lambda: fetch(f"{base}/ready")[0] == 200, 40, "the agent to be ready once registered")


def _imported_modules(tmp_path: Path, **env) -> str:
    """``python -X importtime -m agent`` against a relay that is not there, until it waits to
    reconnect: the modules it imported."""
    tmp_path.mkdir(exist_ok=True)
    log = tmp_path / "importtime.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([PY, "-X", "importtime", "-m", "agent"], stdout=out, stderr=subprocess.STDOUT,
                                env=_env(RELAY_URL=f"wss://127.0.0.1:{free_port()}", REGISTRATION_JWT="x.y.z",
                                         NAME="db", APP_HOST="127.0.0.1", APP_PORT="1", **env), cwd=ROOT)
    try:
        wait_until(lambda: b"reconnecting in" in log.read_bytes(), 30, "the agent to wait for the relay")
    finally:
        proc.terminate()
        proc.wait(10)
    return log.read_text()


def test_agent_without_metrics_listen_imports_none_of_it(tmp_path):
    metrics_modules = re.compile(
        r"\| +(agent\.metrics|tunnel\.ops\.metrics_http|tunnel\.ops\.exposition|tunnel\.ops\.http11|h11)$", re.M)
    assert metrics_modules.findall(_imported_modules(tmp_path / "off")) == []
    on = _imported_modules(tmp_path / "on", METRICS_LISTEN=f"127.0.0.1:{free_port()}")
    assert set(metrics_modules.findall(on)) == {"agent.metrics", "tunnel.ops.metrics_http", "tunnel.ops.exposition",
                                                "tunnel.ops.http11", "h11"}


def test_info_series_give_names_to_ids(relay, agents, service_factory, relay_metrics_port, tmp_path):
    hostile = 'Ac"me \\ } x="1" ünï'
    customer = relay.create_customer(hostile)
    token = relay.jwt("--customer-id", customer)
    service = service_factory("echo")
    agents.start(relay.url, token, "orders-db", service.port, ca_file=relay.ca_file)
    rid = relay.wait_available(customer, "orders-db")["id"]
    url = f"http://127.0.0.1:{relay_metrics_port}/metrics"
    escaped = 'Ac\\"me \\\\ } x=\\"1\\" ünï'
    line = f'tunnel_relay_customer_info{{customer="{customer}",name="{escaped}"}} 1\n'
    wait_until(lambda: line in fetch(url)[1].decode(), 10, "the customer's name in /metrics")
    body = fetch(url)[1]
    assert f'tunnel_relay_resource_info{{resource="{rid}",name="orders-db",customer="{customer}"}} 1\n' in body.decode()
    assert promtool_check(body) == "", promtool_check(body)
    assert _echo(relay.endpoint(customer, "orders-db"), 100)

    # A dashboard query joins the names to the ids.
    prometheus = Prometheus(tmp_path, {"relay": [f"127.0.0.1:{relay_metrics_port}"]}).start()
    try:
        wait_until(prometheus.targets_up, 30, "Prometheus to scrape the relay")
        dashboard = {t["legendFormat"]: t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"]
                     for t in p.get("targets", [])}
        streams = dashboard["{{name}}"].replace("$__rate_interval", "1m").replace("$customer", ".*")
        links = dashboard["{{customer_name}}"].replace("$customer", ".*")

        def joined():
            a, b = prometheus.query(streams.replace("$resource", ".*")), prometheus.query(links)
            return a and b and (a[0]["metric"].get("name"), b[0]["metric"].get("customer_name"))

        assert wait_until(joined, 30, "the dashboard's joins to show names") == ("orders-db", hostile)
    finally:
        prometheus.stop()
