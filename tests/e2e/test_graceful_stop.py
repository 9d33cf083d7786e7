"""SIGTERM stops an agent gracefully: it deregisters its resources (the relay sends new streams
to the group's other agents at once), lets open streams finish up to ``DRAIN_TIMEOUT`` (default
30 s), closes its link and exits 0. A rolling restart of a group of two agents under a steady
``pgbench`` run (a real PostgreSQL the test starts) fails no transaction."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from tests.helpers.processes import connect, echoed, wait_until
from tests.helpers.steady import SteadyConnections


def _start(relay, agents, token, port, **env):
    return agents.start(f"wss://127.0.0.1:{relay.port}", token, "db", port, ca_file=relay.ca_file, **env)


def test_sigterm_deregisters_drains_and_exits_zero(relay, agents, service_factory):
    service = service_factory("echo")
    customer = relay.create_customer("acme")
    token = relay.jwt("--customer-id", customer)
    stopping = _start(relay, agents, token, service.port)
    relay.wait_available(customer, "db")
    addr = relay.endpoint(customer, "db")
    open_stream = connect(addr)  # rides the agent about to stop
    assert echoed(open_stream, b"before")
    other = _start(relay, agents, token, service.port)
    relay.wait_available(customer, "db", agents=2)

    with SteadyConnections(addr) as steady:
        wait_until(lambda: steady.count_ok() >= 5, 20, "traffic through both agents")
        stopping.signal(signal.SIGTERM)
        wait_until(lambda: relay.resource(customer, "db")["agents"] == 1, 10, "the stopping agent to deregister")
        deregistered = time.monotonic()
        wait_until(lambda: steady.count_ok(since=deregistered) >= 10, 20, "traffic through the other agent")
        assert stopping.alive(), "the agent left before its open stream finished"
        # The open stream goes on during the drain.
        assert echoed(open_stream, b"during the drain")
    assert not steady.failures(), steady.failures()[:3]
    open_stream.close()
    assert stopping.proc.wait(15) == 0
    log = stopping.log()
    assert "stopping: deregistering db; open streams (1) may finish for up to 30 s (DRAIN_TIMEOUT)" in log
    tail = log.split("stopping: deregistering")[1]
    assert "dialling" not in tail, "a new stream reached the stopping agent"
    # "stopped" once, when the drain is over (not first by the link slot that had no relay).
    assert [line.split(" agent: ")[1] for line in tail.splitlines() if " agent: " in line][-1:] == ["stopped"]
    assert log.count(" agent: stopped") == 1, log[-2000:]

    # DRAIN_TIMEOUT bounds the wait: the stream still open then is reset, and exit is 0.
    stuck = connect(addr)
    assert echoed(stuck, b"held open")
    other.signal(signal.SIGTERM)  # DRAIN_TIMEOUT 30 s: would wait for `stuck`
    quick = _start(relay, agents, token, service.port, DRAIN_TIMEOUT="1")
    relay.wait_available(customer, "db")
    stuck2 = connect(addr)  # the only agent now: `quick`
    assert echoed(stuck2, b"held open too")
    t0 = time.monotonic()
    quick.signal(signal.SIGTERM)
    assert quick.proc.wait(15) == 0
    assert time.monotonic() - t0 < 5
    assert "DRAIN_TIMEOUT (1 s) reached with 1 stream(s) open" in quick.log()
    for s in (stuck, stuck2):
        s.close()
    assert other.proc.wait(15) == 0


# --------------------------------------------------------------------------- pgbench


def _pg(*args: str, port: int, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PGUSER": "postgres", "PGDATABASE": "postgres", "PGHOST": "127.0.0.1",
           "PGPORT": str(port), "PGCONNECT_TIMEOUT": "20"}
    return subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=timeout)


def test_rolling_restart_of_two_agents_under_pgbench_fails_no_transaction(relay, agents, postgres):
    customer = relay.create_customer("acme")
    token = relay.jwt("--customer-id", customer)
    group = [_start(relay, agents, token, postgres), _start(relay, agents, token, postgres)]
    relay.wait_available(customer, "db", agents=2)
    _, endpoint = relay.endpoint(customer, "db")
    init = _pg("pgbench", "-i", "-s", "1", "-q", port=postgres)
    assert init.returncode == 0, init.stderr
    check = _pg("psql", "-Atc", "select count(*) from pgbench_branches", port=endpoint)
    assert check.returncode == 0 and check.stdout.strip() == "1", check.stderr

    # One new connection per transaction (-C): every transaction crosses the restart.
    bench = subprocess.Popen(
        ["pgbench", "-C", "-c", "4", "-j", "2", "-T", "15", "-n", "-P", "5"],
        env={**os.environ, "PGUSER": "postgres", "PGDATABASE": "postgres", "PGHOST": "127.0.0.1",
             "PGPORT": str(endpoint)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: relay.resource(customer, "db")["agents_detail"][0]["bytes_received"] > 0, 20,
                   "pgbench traffic")
        for i in range(2):
            old = group[i]
            old.signal(signal.SIGTERM)
            assert old.proc.wait(40) == 0, old.log()[-2000:]
            group[i] = _start(relay, agents, token, postgres)
            wait_until(lambda: "serving resource db" in group[i].log(), 20, "the restarted agent to register")
            relay.wait_available(customer, "db", agents=2)
        assert bench.poll() is None, "the rolling restart outlasted the pgbench run"
        out, _ = bench.communicate(timeout=90)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
    print(out[-1500:])
    assert bench.returncode == 0, out[-3000:]
    assert "aborted" not in out, out[-3000:]
    processed = int(out.split("number of transactions actually processed: ")[1].split()[0])
    failed = int(out.split("number of failed transactions: ")[1].split()[0])
    assert failed == 0 and processed > 20, out[-3000:]
