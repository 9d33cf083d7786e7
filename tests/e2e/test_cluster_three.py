"""Three relays on one PostgreSQL (127.0.0.1, .2, .3), as real processes: forwarding between
relays, agents linked to several relays, drain, rotation and a relay killed."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import threading
import time

import pytest

from tests.helpers import wait_until
from tests.helpers.cluster import AGENT_ENV, HOSTS, Cluster, admin, aliases_work, cluster, links_of  # noqa: F401 - a fixture
from tests.helpers.processes import Relay, connect, recv_all

pytestmark = pytest.mark.skipif(not aliases_work(), reason="127.0.0.2/.3 are not loopback addresses here")

def roundtrip(addr: tuple[str, int], payload: bytes) -> bytes:
    """Send ``payload``, half-close, read everything back (a drain-then-echo service)."""
    with connect(addr) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        return recv_all(s)


def relay_of(c: Cluster, relay_id: str) -> Relay:
    for relay in c.relays:
        if admin(relay).cluster_status()["relay_id"] == relay_id:
            return relay
    raise AssertionError(f"no relay {relay_id}")


def send_slowly(addr: tuple[str, int], payload: bytes, pieces: int, pause: threading.Event, result: dict) -> None:
    """A worker that sends ``payload`` in ``pieces`` (waiting on ``pause`` between them, so the
    test decides when the rest goes), half-closes and records the sha256 of the answer."""
    try:
        with connect(addr) as s:
            step = len(payload) // pieces
            for i in range(pieces):
                s.sendall(payload[i * step:(i + 1) * step if i < pieces - 1 else len(payload)])
                if i == 0:
                    pause.wait(30)
            s.shutdown(socket.SHUT_WR)
            result["digest"] = hashlib.sha256(recv_all(s)).hexdigest()
    except OSError as exc:
        result["error"] = exc


def test_exact_bytes_through_every_relay(cluster, agents, service_factory):
    c = cluster()
    r1, r2, r3 = c.relays
    customer = r1.create_customer("acme")
    token = r1.jwt("--customer-id", customer)
    service = service_factory("drain-then-echo")
    # "db": one agent linked to the second relay only; "api": one agent with two links,
    # told about the first relay only (it learns the others).
    agents.start(r2.url, token, "db", service.port, ca_file=c.ca_file, RELAY_LINKS="1", **AGENT_ENV)
    agents.start(r1.url, token, "api", service.port, ca_file=c.ca_file, **AGENT_ENV)
    db = r2.wait_available(customer, "db")
    api = r1.wait_available(customer, "api")
    wait_until(lambda: len(links_of(r3, api["id"])) == 2, 20, "the api agent's second link")
    links = links_of(r3, api["id"])
    assert sorted(link["slot"] for link in links) == [0, 1] and len({link["relay_id"] for link in links}) == 2
    assert links[0]["agent_instance"] == links[1]["agent_instance"]
    assert [link["relay_url"] for link in links_of(r1, db["id"])] == [r2.url]
    # The cluster view is the same from any relay, and every relay shows the resource available.
    for relay in c.relays:
        assert {r["name"]: (r["status"], r["agents"]) for r in relay.resources()} == {
            "db": ("AVAILABLE", 1), "api": ("AVAILABLE", 2)}
        assert "draining" not in relay.cli("cluster", "status").stdout
    payloads = {(host, name): os.urandom(1024 * 1024 + i) for i, host in enumerate(HOSTS) for name in ("db", "api")}
    ports = {"db": int(db["endpoint"].rsplit(":", 1)[1]), "api": int(api["endpoint"].rsplit(":", 1)[1])}
    results: dict = {}

    def worker(host: str, name: str) -> None:
        results[host, name] = roundtrip((host, ports[name]), payloads[host, name])

    threads = [threading.Thread(target=worker, args=key) for key in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for key, payload in payloads.items():
        assert results.get(key) == payload, f"bytes through {key}"
    for relay in c.relays:
        assert "Traceback" not in relay.proc.log()


def test_kill_9_of_the_relay_the_agent_was_told_about(cluster, agents, service_factory):
    c = cluster()
    r1, r2, r3 = c.relays
    customer = r1.create_customer("acme")
    token = r1.jwt("--customer-id", customer)
    service = service_factory("drain-then-echo")
    agent = agents.start(r1.url, token, "db", service.port, ca_file=c.ca_file, **AGENT_ENV)
    db = r1.wait_available(customer, "db")
    port = int(db["endpoint"].rsplit(":", 1)[1])
    wait_until(lambda: len(links_of(r2, db["id"])) == 2, 20, "the agent's second link")
    r1.proc.kill()
    killed = time.monotonic()
    # The others keep serving within seconds, on both their endpoints.
    for host in HOSTS[1:]:
        wait_until(lambda: _serves((host, port)), 10, f"{host} to serve after the kill")
    assert time.monotonic() - killed < 10
    # The agent links its first slot again, to a relay it learned of.
    wait_until(lambda: len(links_of(r2, db["id"])) == 2 and all(
        link["relay_url"] != r1.url for link in links_of(r2, db["id"])), 30, "both links on the living relays")
    assert agent.alive()
    assert "Traceback" not in r2.proc.log() + r3.proc.log()


def _serves(addr: tuple[str, int]) -> bool:
    payload = os.urandom(65536)
    try:
        return roundtrip(addr, payload) == payload
    except OSError:
        return False


def test_drain_during_a_transfer_loses_no_stream(cluster, agents, service_factory):
    c = cluster("--drain-timeout", "20")
    r1, r2, r3 = c.relays
    customer = r1.create_customer("acme")
    token = r1.jwt("--customer-id", customer)
    service = service_factory("drain-then-echo")
    # One link, on the relay that will drain: its streams stay there, new ones go elsewhere.
    agents.start(r1.url, token, "db", service.port, ca_file=c.ca_file, RELAY_LINKS="1", **AGENT_ENV)
    db = r1.wait_available(customer, "db")
    port = int(db["endpoint"].rsplit(":", 1)[1])
    payload = os.urandom(4 * 1024 * 1024)
    pauses = [threading.Event(), threading.Event()]
    results = [{}, {}]
    # A worker on the draining relay, one on another relay forwarded to it.
    threads = [threading.Thread(target=send_slowly, args=((host, port), payload, 4, pause, result))
               for host, pause, result in zip(HOSTS[:2], pauses, results)]
    for t in threads:
        t.start()
    wait_until(lambda: len([r for r in r1.resources(extended=True)[0]["agents_detail"] if r["active_streams"]]) == 1
               and r1.resources(extended=True)[0]["agents_detail"][0]["active_streams"] == 2, 20,
               "both transfers under way")
    r1.proc.signal(15)
    # The agent moves its link first: new connections are served by the others meanwhile.
    wait_until(lambda: any(link["relay_url"] != r1.url for link in links_of(r2, db["id"])), 20,
               "the agent to link elsewhere")
    assert _serves((HOSTS[1], port)) and _serves((HOSTS[2], port))
    for pause in pauses:
        pause.set()
    for t in threads:
        t.join(60)
    digest = hashlib.sha256(payload).hexdigest()
    assert results == [{"digest": digest}, {"digest": digest}]
    assert r1.proc.proc.wait(30) == 0
    log = r1.proc.log()
    assert "drained: no stream in flight" in log and "Traceback" not in log
    # The others forwarded streams meanwhile and hold none of them any more: they stop at once
    # (a worker that half-closed before its forwarded stream was open once stayed counted).
    for relay in (r2, r3):
        relay.proc.signal(15)
        assert relay.proc.proc.wait(10) == 0
        assert "drained: no stream in flight" in relay.proc.log()


def test_rotation_on_one_relay_drops_the_agent_everywhere(cluster, agents, service_factory):
    c = cluster()
    r1, r2, r3 = c.relays
    customer = r1.create_customer("acme")
    token = r1.jwt("--customer-id", customer)
    service = service_factory("echo")
    agent = agents.start(c.urls(1, 2), token, "db", service.port, ca_file=c.ca_file, **AGENT_ENV)
    db = r2.wait_available(customer, "db")
    wait_until(lambda: {link["relay_url"] for link in links_of(r1, db["id"])} == {r2.url, r3.url}, 20,
               "links on the second and third relays")
    admin(r1).registration_jwt(customer, resource_id=db["id"], rotate=True)
    rotated = time.monotonic()
    wait_until(lambda: not links_of(r1, db["id"]), 2.0, "every relay to drop the agent")
    assert time.monotonic() - rotated < 2.0
    wait_until(lambda: not agent.alive(), 10, "the revoked agent to stop")
    assert "revoked" in agent.log()


def test_database_stopped_and_restarted_under_load(cluster, agents, service_factory, postgres_server):
    c = cluster(RELAY_DB_RECONNECT_MAX="1")
    r1, r2, r3 = c.relays
    customer = r1.create_customer("acme")
    token = r1.jwt("--customer-id", customer)
    service = service_factory("drain-then-echo")
    agents.start(r2.url, token, "db", service.port, ca_file=c.ca_file, RELAY_LINKS="1", **AGENT_ENV)
    db = r2.wait_available(customer, "db")
    port = int(db["endpoint"].rsplit(":", 1)[1])
    assert all(_serves((host, port)) for host in HOSTS)  # each relay now knows who holds the agent
    stop = threading.Event()
    failures: list = []
    done = [0]

    def load(host: str) -> None:
        while not stop.is_set():
            if not _serves((host, port)):
                failures.append(host)
            done[0] += 1

    threads = [threading.Thread(target=load, args=(host,)) for host in HOSTS]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: done[0] >= 6, 20, "load under way")
        postgres_server.stop()
        try:
            before = done[0]
            wait_until(lambda: done[0] >= before + 15, 30, "streams through every relay while the database is down")
        finally:
            postgres_server.start()
        wait_until(lambda: r1.cli("customers", "list", check=False).returncode == 0, 30, "admin calls again")
        before = done[0]
        wait_until(lambda: done[0] >= before + 6, 30, "streams after the database is back")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not failures
    for relay in c.relays:
        assert "Traceback" not in relay.proc.log()


def test_a_database_outage_longer_than_the_member_ttl_expires_no_relay(cluster, agents, service_factory,
                                                                      postgres_server):
    """No relay could heartbeat while the database was away: when it returns, none takes the
    others for gone (their rows and agent links stay), and forwarded streams go on."""
    c = cluster()  # the member TTL is 4 s here; the relays reconnect at their own pace
    r1, r2, r3 = c.relays
    customer = r1.create_customer("acme")
    token = r1.jwt("--customer-id", customer)
    service = service_factory("drain-then-echo")
    agents.start(r2.url, token, "db", service.port, ca_file=c.ca_file, RELAY_LINKS="1", **AGENT_ENV)
    db = r2.wait_available(customer, "db")
    port = int(db["endpoint"].rsplit(":", 1)[1])
    postgres_server.stop()
    try:
        down = time.monotonic()
        wait_until(lambda: time.monotonic() - down > 8, 12, "an outage twice the member TTL", interval=0.5)
    finally:
        postgres_server.start()
    wait_until(lambda: all(relay.cli("customers", "list", check=False).returncode == 0 for relay in c.relays), 30,
               "admin calls on every relay again")
    back = time.monotonic()
    # Two TTLs after the return: every relay still there, the agent's link still recorded.
    wait_until(lambda: time.monotonic() - back > 8, 12, "two member TTLs", interval=0.5)
    status = admin(r1).cluster_status()
    assert len(status["relays"]) == 3 and len(links_of(r1, db["id"])) == 1, status
    for relay in c.relays:
        assert "stopped heartbeating" not in relay.proc.log()
        assert "taken for gone" not in relay.proc.log()
    assert _serves((HOSTS[0], port)) and _serves((HOSTS[2], port))


def test_agent_restart_under_forwarded_connections_fails_none(cluster, agents, service_factory):
    """Workers reach the resource through a relay that holds no agent of it (forwarded to the
    one that does); the agent restarts within two seconds: connections made while no relay
    serves the resource wait and are served once it is back, none reset."""
    from tests.helpers.steady import SteadyConnections

    c = cluster()
    r1, r2, _ = c.relays
    customer = r1.create_customer("acme")
    token = r1.jwt("--customer-id", customer)
    service = service_factory("echo")
    first = agents.start(r2.url, token, "db", service.port, ca_file=c.ca_file, RELAY_LINKS="1", **AGENT_ENV)
    db = r2.wait_available(customer, "db")
    addr = (HOSTS[0], int(db["endpoint"].rsplit(":", 1)[1]))  # r1's endpoint: forwarded to r2
    with SteadyConnections(addr) as steady:
        wait_until(lambda: steady.count_ok() >= 10, 20, "forwarded traffic before the restart")
        first.signal(signal.SIGTERM)
        stopped = time.monotonic()
        assert first.proc.wait(15) == 0, first.log()[-2000:]
        second = agents.start(r2.url, token, "db", service.port, ca_file=c.ca_file, RELAY_LINKS="1", **AGENT_ENV)
        wait_until(lambda: "serving resource db" in second.log(), 20, "the new agent to register")
        registered = time.monotonic()
        wait_until(lambda: steady.count_ok(since=registered) >= 10, 20, "forwarded traffic after the restart")
    gap = [a for a in steady.snapshot() if stopped <= a.started <= registered]
    assert gap, "no connection was made while no relay served the resource"
    assert not steady.failures(), steady.failures()[:5]
    assert "waiting connection(s) go to it" not in r1.proc.log()  # r1 never had an agent: it forwarded
    for relay in c.relays:
        assert "Traceback" not in relay.proc.log()


def test_a_killed_relays_agents_stop_counting_within_5_s(cluster, agents, service_factory):
    # The membership TTL is long here (the default), so only the lost peer link can make the
    # other relays stop counting the dead relay's agent link in time.
    c = cluster(RELAY_MEMBER_TTL="20")
    r1, r2, r3 = c.relays
    customer = r1.create_customer("acme")
    token = r1.jwt("--customer-id", customer)
    service = service_factory("drain-then-echo")
    agent = agents.start(r2.url, token, "db", service.port, ca_file=c.ca_file, RELAY_LINKS="1", **AGENT_ENV)
    r2.wait_available(customer, "db")

    def view(relay: Relay) -> dict:
        return next(r for r in admin(relay).list_resources(extended=True) if r["name"] == "db")

    for relay in (r1, r3):
        wait_until(lambda: view(relay)["agents"] == 1, 20, "the agent counted everywhere")
    # The agent cannot link again (stopped), and its relay dies without a word.
    agent.signal(signal.SIGSTOP)
    try:
        r2.proc.kill()
        killed = time.monotonic()
        wait_until(lambda: all(view(relay)["status"] == "UNAVAILABLE" for relay in (r1, r3)), 10,
                   "the other relays to stop counting the dead relay's agent")
        assert time.monotonic() - killed <= 5.0
        for relay in (r1, r3):
            assert view(relay)["agents"] == 0 and view(relay)["agents_detail"] == []
            assert "unreachable" in relay.cli("cluster", "status").stdout
    finally:
        agent.signal(signal.SIGCONT)
    # The agent links again (to a relay it learned of) and is counted everywhere.
    for relay in (r1, r3):
        wait_until(lambda: view(relay)["agents"] == 1, 30, "the agent back")
    assert "Traceback" not in r1.proc.log() + r3.proc.log()


def test_a_relay_restarted_after_a_kill_forgets_its_previous_run(cluster):
    """kill -9 and a restart before the old run expired: the new run removes the old one's row
    (no relay dials or waits for it), and the others log its joining once."""
    c = cluster(RELAY_MEMBER_TTL="60")  # the old row would stay a minute
    r1, r2, _ = c.relays
    old = admin(r2).cluster_status()["relay_id"]
    r2.proc.kill()
    c.restart(r2)
    new = admin(r2).cluster_status()["relay_id"]
    log = r2.proc.log()
    assert f"relay {old} was this relay's previous run" in log, log[-3000:]
    assert f"cannot reach relay {old}" not in log
    wait_until(lambda: old not in {r["id"] for r in admin(r1).cluster_status()["relays"]}, 10,
               "the old run to be gone for the others")
    wait_until(lambda: f"relay {new} joined" in r1.proc.log(), 10, "r1 to hear of the new run")
    assert r1.proc.log().count(f"relay {new} joined") == 1
