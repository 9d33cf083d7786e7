"""The deployment example of deploy/cluster without Docker: the same processes its compose file
starts (PostgreSQL, three relays with the same options, HAProxy with the same haproxy.cfg,
its variables set as the compose file sets them) on loopback addresses, agents and workers
through HAProxy; then a rolling restart of every relay under load loses no stream."""

from __future__ import annotations

import os
import random
import shutil
import socket
import threading
import time

import pytest

from tests.helpers import wait_until
from tests.helpers.cluster import AGENT_ENV, HOSTS, admin, aliases_work, cluster  # noqa: F401 - a fixture
from tests.helpers.processes import ROOT, Proc, _env, connect, free_port, recv_all

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
LB = "127.0.0.4"
CONFIG = ROOT / "deploy" / "cluster" / "haproxy.cfg"

pytestmark = [
    pytest.mark.skipif(not aliases_work(), reason="127.0.0.2/.3 are not loopback addresses here"),
    pytest.mark.skipif(not os.access(HAPROXY, os.X_OK), reason="haproxy is not installed (scripts/setup.sh)"),
]


def _port_range() -> tuple[int, int]:
    """Ten consecutive ports free on the relays' hosts and the balancer's."""
    for _ in range(50):
        low = random.randrange(30000, 39990)
        free = True
        for port in range(low, low + 10):
            for host in (*HOSTS, LB):
                with socket.socket() as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    try:
                        s.bind((host, port))
                    except OSError:
                        free = False
        if free:
            return low, low + 9
    raise RuntimeError("no free port range")


def start_haproxy(tmp_path, agent_port: int, ports: tuple[int, int]) -> Proc:
    env = _env(LB_BIND=LB, AGENT_PORT=agent_port, ENDPOINT_PORTS=f"{ports[0]}-{ports[1]}", RELAY1=HOSTS[0],
               RELAY2=HOSTS[1], RELAY3=HOSTS[2], CHECK_INTERVAL="200ms")
    proc = Proc("haproxy", [HAPROXY, "-db", "-f", str(CONFIG)], env, tmp_path / "haproxy.log").start()

    def listening() -> bool:
        assert proc.alive(), proc.log()
        with socket.socket() as s:
            return s.connect_ex((LB, agent_port)) == 0

    wait_until(listening, 20, "haproxy to listen")
    return proc


def roundtrip(addr: tuple[str, int], payload: bytes) -> bytes:
    with connect(addr) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        return recv_all(s)


def test_rolling_restart_behind_haproxy_loses_no_stream(tmp_path, cluster, agents, service_factory):  # noqa: F811
    low, high = _port_range()
    c = cluster("--port-range", f"{low}-{high}", "--server-name", LB, "--drain-timeout", "15")
    r1 = c.relays[0]
    lb = start_haproxy(tmp_path, r1.port, (low, high))
    try:
        customer = r1.create_customer("acme")
        token = r1.jwt("--customer-id", customer)
        service = service_factory("drain-then-echo")
        # Agents know the balancer only; each learns the relays and keeps two links.
        for _ in range(2):
            agents.start(f"wss://{LB}:{r1.port}", token, "db", service.port, ca_file=c.ca_file, **AGENT_ENV)
        db = r1.wait_available(customer, "db", agents=4)
        port = int(db["endpoint"].rsplit(":", 1)[1])
        assert low <= port <= high
        payload = os.urandom(2 * 1024 * 1024)
        assert roundtrip((LB, port), payload) == payload

        stop = threading.Event()
        outcomes = {"ok": 0, "failed": []}
        long_results: list = []

        def short_streams() -> None:
            while not stop.is_set():
                data = os.urandom(32 * 1024)
                try:
                    back = roundtrip((LB, port), data)
                except OSError as exc:
                    outcomes["failed"].append(repr(exc))
                    continue
                if back == data:
                    outcomes["ok"] += 1
                else:  # HAProxy passes a relay's reset on as a clean end of stream
                    outcomes["failed"].append(f"{len(back)} of {len(data)} bytes back, at {time.time():.3f}")

        def long_stream() -> None:
            # Several seconds long: it spans the drain of whichever relay carries it.
            try:
                with connect((LB, port)) as s:
                    sent = b""
                    for _ in range(40):
                        piece = os.urandom(16 * 1024)
                        s.sendall(piece)
                        sent += piece
                        time.sleep(0.05)
                    s.shutdown(socket.SHUT_WR)
                    long_results.append(recv_all(s) == sent)
            except OSError as exc:
                long_results.append(repr(exc))

        workers = [threading.Thread(target=short_streams) for _ in range(2)]
        for t in workers:
            t.start()
        try:
            for relay in c.relays:
                before = outcomes["ok"]
                long = threading.Thread(target=long_stream)
                long.start()
                relay.proc.signal(15)
                assert relay.proc.proc.wait(30) == 0, relay.proc.log()[-2000:]
                assert "drained: no stream in flight" in relay.proc.log()
                c.restart(relay)
                wait_until(lambda: len(admin(relay).cluster_status()["relays"]) == 3, 20, "three relays again")
                long.join(30)
                wait_until(lambda: outcomes["ok"] >= before + 10, 30, "streams flowing after the restart")
        finally:
            stop.set()
            for t in workers:
                t.join(30)
        assert not outcomes["failed"], outcomes["failed"][:5]
        assert outcomes["ok"] >= 30
        assert long_results == [True, True, True]
        # Every agent is still linked twice, to two relays, none of them the old processes.
        status = admin(r1).cluster_status()
        live = {r["id"] for r in status["relays"]}
        links = [link for link in status["links"] if db["id"] in link["resources"]]
        assert len(links) == 4 and all(link["relay_id"] in live for link in links)
        assert roundtrip((LB, port), payload) == payload
    finally:
        lb.stop()
