"""What the relay-to-relay hop costs (proxy peering) against a worker reaching the relay that
holds the agent (what a full mesh of agent links always gives): three relays on PostgreSQL
(127.0.0.1, .2, .3), one real agent linked to the second relay only, an echo service; the
same measurements through the second relay's endpoint (local agent) and through the first's
(forwarded over the peer link).

- 64-byte round trips on one connection: p50 and p99;
- new connections per second (connect, one 64-byte round trip, close), sequential;
- one bulk stream, worker → service and back (drain-then-echo of 64 MiB): Mbit/s;
- ``pgbench`` select-only (8 clients, PostgreSQL as the private service, the agent serving it
  on the second relay): TPS through each relay, ``--pg-repeat`` runs of ``--pg-seconds``
  alternating local and forwarded (A, B, A, B...), medians and their ratio, and the CPU time
  each relay and the agent spent per transaction (``/proc/PID/stat``, medians): where the
  forwarded hop's cost lies; ``--pg-seconds 0`` skips it.

    python bench/bench_forwarding.py [--rounds 2000] [--pg-seconds 10 --pg-repeat 3]
                                     [--profile DIR] [--out bench/results/forwarding.json]

``--profile DIR``: py-spy (``--native``, raw collapsed stacks) of both relays during the first
pgbench run of each route, ``DIR/<route>-<relay>.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.peers import pgbench  # noqa: E402
from tests.helpers.postgres import PostgresServer  # noqa: E402
from tests.helpers.processes import Agents, PrivateService, Relay, connect, recv_all  # noqa: E402

HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def round_trips(addr, rounds: int) -> tuple[float, float]:
    with connect(addr) as s:
        samples = []
        for _ in range(rounds):
            t = time.perf_counter()
            s.sendall(b"x" * 64)
            got = 0
            while got < 64:
                got += len(s.recv(64 - got))
            samples.append(time.perf_counter() - t)
    samples.sort()
    return samples[len(samples) // 2] * 1e6, samples[int(len(samples) * 0.99)] * 1e6


def connections_per_second(addr, seconds: float = 3.0) -> float:
    n, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        with connect(addr) as s:
            s.sendall(b"x" * 64)
            got = 0
            while got < 64:
                got += len(s.recv(64 - got))
        n += 1
    return n / seconds


def bulk_mbit(addr, size: int) -> float:
    payload = os.urandom(size)
    t = time.perf_counter()
    with connect(addr) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        back = recv_all(s)
    assert back == payload
    return 2 * size * 8 / (time.perf_counter() - t) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--bulk-mib", type=int, default=64)
    parser.add_argument("--pg-seconds", type=int, default=10, help="each pgbench -S run (0: none)")
    parser.add_argument("--pg-repeat", type=int, default=3)
    parser.add_argument("--skip-echo", action="store_true", help="pgbench only")
    parser.add_argument("--profile", type=Path, metavar="DIR", help="py-spy of the relays during pgbench")
    parser.add_argument("--out")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="forwarding-"))
    pg = PostgresServer().start()
    relays, agents = [], Agents(work)
    echo, drain = PrivateService("echo"), PrivateService("drain-then-echo")
    database = pgbench.Database() if args.pg_seconds else None
    load_before = open("/proc/loadavg").read().split()[:3]
    try:
        env = {"RELAY_DATABASE_URL": pg.url(pg.create_database()), "RELAY_LOG_LEVEL": "warning"}
        for i, host in enumerate(HOSTS):
            if i:
                shutil.copytree(relays[0].state_dir, work / f"r{i + 1}", ignore=shutil.ignore_patterns("admin.json"))
            relay = Relay(work, host=host, state_dir=work / f"r{i + 1}")
            if i:
                relay.port = relays[0].port
            relays.append(relay.start(**env))
        customer = relays[0].create_customer("bench")
        token = relays[0].jwt("--customer-id", customer)
        agents.start(relays[1].url, token, "echo", echo.port, ca_file=relays[0].ca_file, RELAY_LINKS="1",
                     LOG_LEVEL="WARNING")
        agents.start(relays[1].url, token, "bulk", drain.port, ca_file=relays[0].ca_file, RELAY_LINKS="1",
                     LOG_LEVEL="WARNING")
        if database is not None:
            pg_agent = agents.start(relays[1].url, token, "pg", database.port, ca_file=relays[0].ca_file,
                                    RELAY_LINKS="1", LOG_LEVEL="WARNING")
            relays[1].wait_available(customer, "pg")
        relays[1].wait_available(customer, "echo")
        relays[1].wait_available(customer, "bulk")
        ports = {r["name"]: int(r["endpoint"].rsplit(":", 1)[1]) for r in relays[1].resources()}
        results = {"load_average_before": load_before}
        routes = (("local agent (relay 2)", HOSTS[1]), ("forwarded (relay 1 -> relay 2)", HOSTS[0]))
        for label, host in routes if not args.skip_echo else ():
            round_trips((host, ports["echo"]), 200)  # warm up (peer link, caches)
            p50, p99 = round_trips((host, ports["echo"]), args.rounds)
            cps = connections_per_second((host, ports["echo"]))
            mbit = statistics.median(bulk_mbit((host, ports["bulk"]), args.bulk_mib * 1024 * 1024) for _ in range(3))
            results[label] = {"rtt_p50_us": round(p50), "rtt_p99_us": round(p99), "connections_per_s": round(cps),
                              "bulk_mbit_s": round(mbit)}
            print(f"{label}: 64 B round trip p50 {p50:.0f} µs, p99 {p99:.0f} µs; {cps:.0f} connections/s; "
                  f"bulk {mbit:.0f} Mbit/s", flush=True)
        if database is not None:
            tps: dict[str, list[float]] = {label: [] for label, _ in routes}
            pids = {"relay 1": relays[0].proc.pid, "relay 2": relays[1].proc.pid, "agent": pg_agent.pid}
            cpu: dict[str, dict[str, list[float]]] = {label: {p: [] for p in pids} for label, _ in routes}
            for run in range(args.pg_repeat):
                for label, host in routes:
                    spies = []
                    if args.profile and run == 0:
                        args.profile.mkdir(parents=True, exist_ok=True)
                        route = "local" if host == HOSTS[1] else "forwarded"
                        spies = [subprocess.Popen(
                            ["py-spy", "record", "-p", str(pids[r]), "-d", str(args.pg_seconds), "-r", "200",
                             "--native", "-f", "raw", "-o", str(args.profile / f"{route}-{r.replace(' ', '')}.txt")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for r in ("relay 1", "relay 2")]
                    before = {p: cpu_seconds(pid) for p, pid in pids.items()}
                    t = time.perf_counter()
                    tps[label].append(database.run(host, ports["pg"], args.pg_seconds, select_only=True))
                    # pgbench's TPS excludes connection set-up; the CPU is divided over the
                    # transactions of the whole run (its elapsed time at that rate)
                    txns = tps[label][-1] * (time.perf_counter() - t)
                    for p, pid in pids.items():
                        cpu[label][p].append((cpu_seconds(pid) - before[p]) / txns * 1e6)
                    for spy in spies:
                        spy.wait(60)
                    print(f"{label}: pgbench -S {tps[label][-1]:,.0f} TPS; CPU µs per transaction: "
                          + ", ".join(f"{p} {cpu[label][p][-1]:.0f}" for p in pids), flush=True)
            results["pgbench_cpu_us_per_transaction"] = {
                label: {p: round(statistics.median(v), 1) for p, v in per.items()} for label, per in cpu.items()}
            local, forwarded = (statistics.median(tps[label]) for label, _ in routes)
            results["pgbench_select_tps"] = {label: [round(t) for t in runs] for label, runs in tps.items()}
            results["pgbench_select_forwarded_over_local"] = round(forwarded / local, 3)
            print(f"pgbench -S medians: local {local:,.0f} TPS, forwarded {forwarded:,.0f} TPS "
                  f"({forwarded / local:.2f}x)", flush=True)
        results["load_average_after"] = open("/proc/loadavg").read().split()[:3]
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    finally:
        agents.stop_all()
        for relay in relays:
            relay.stop()
        echo.close()
        drain.close()
        pg.destroy()
        if database is not None:
            database.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
