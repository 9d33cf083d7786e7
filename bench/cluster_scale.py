"""Cluster scale on this machine: PostgreSQL, three relays (127.0.0.1, .2, .3) and N simulated
agents (bench/agent_swarm.py, several processes) each with its own resource.

Phases (figures printed and written to ``--out`` as JSON):

1. **register**: the swarm registers every agent (creating N resources; every relay binds
   every endpoint); time to all registered.
2. **memory**: relays restarted without agents (their endpoints bound at start) give the
   baseline RSS; the swarm links again; relay RSS per idle agent link = (RSS with links −
   baseline) / links on that relay (TLS included: everything the relay holds for a link).
3. **admin**: ``GET /v1/resources`` (what ``tunnel-relay resources list`` asks) with N
   resources, timed on each relay.
4. **restart**: the first relay is killed (SIGKILL) and started again; its agents come back
   with their jittered backoff: registrations per second and time to all back. Then the same
   relay is restarted with SIGTERM (drain: its agents move to the others in tenths of the
   window): registrations per second on the other relays.

    python bench/cluster_scale.py --agents 10000 --swarms 4 --out bench/results/cluster-scale.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from relay.control.admin_client import AdminClient  # noqa: E402
from tests.helpers.postgres import PostgresServer  # noqa: E402
from tests.helpers.processes import Proc, Relay, _env, free_port, wait_until  # noqa: E402

HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


class Bench:
    def __init__(self, args, work: Path) -> None:
        self.args = args
        self.work = work
        self.pg = PostgresServer().start()
        self.url = self.pg.url(self.pg.create_database())
        self.env = {"RELAY_DATABASE_URL": self.url, "RELAY_HEARTBEAT_INTERVAL": "2", "RELAY_MEMBER_TTL": "10",
                    "TUNNEL_MAX_RESOURCES_PER_CUSTOMER": "100000", "TUNNEL_MAX_LINKS_PER_CUSTOMER": "100000",
                    "TUNNEL_MAX_REGISTRATIONS_PER_MINUTE": "1000000", "TUNNEL_CUSTOMER_FD_SHARE": "1",
                    "RELAY_LOG_LEVEL": "warning"}
        self.relays: list[Relay] = []
        self.swarms: list[Proc] = []
        self.events = work / "events.jsonl"
        self.results: dict = {"agents": args.agents, "relays": 3, "create_concurrency": args.create_concurrency,
                              "load_average_before": loadavg()}

    def start_relays(self) -> None:
        first = Relay(self.work, host=HOSTS[0], state_dir=self.work / "r1")
        first.start("--port-range", "10000-29999", **self.env)
        self.relays = [first]
        for i, host in enumerate(HOSTS[1:], start=2):
            if not (self.work / f"r{i}").exists():
                shutil.copytree(first.state_dir, self.work / f"r{i}", ignore=shutil.ignore_patterns("admin.json"))
            relay = Relay(self.work, host=host, state_dir=self.work / f"r{i}")
            relay.port = first.port
            relay.start("--port-range", "10000-29999", **self.env)
            self.relays.append(relay)

    def restart(self, relay: Relay, sig: int) -> None:
        relay.proc.signal(sig)
        relay.proc.proc.wait(120)
        relay.start("--port-range", "10000-29999", **self.env)

    def admin(self, relay: Relay) -> AdminClient:
        return AdminClient.discover(relay.state_dir, timeout=120)

    def start_swarms(self, concurrency: int | None = None) -> None:
        urls = ",".join(r.url for r in self.relays)
        per = -(-self.args.agents // self.args.swarms)
        for n in range(self.args.swarms):
            first = n * per
            count = min(per, self.args.agents - first)
            cmd = [sys.executable, str(ROOT / "bench" / "agent_swarm.py"), "--relay-url", urls, "--ca-file",
                   self.relays[0].ca_file, "--token-file", str(self.work / "jwt"), "--agents", str(count),
                   "--first", str(first), "--events", str(self.events)]
            if concurrency:
                cmd += ["--concurrency", str(concurrency)]
            self.swarms.append(Proc(f"swarm{n}", cmd, _env(), self.work / f"swarm{n}.log").start())

    def stop_swarms(self) -> None:
        for swarm in self.swarms:
            swarm.stop(60)
        self.swarms = []

    def registered_now(self) -> int:
        """Agents registered now, from the events file."""
        state: dict[int, bool] = {}
        with open(self.events) as f:
            for line in f:
                e = json.loads(line)
                if e["event"] == "registered":
                    state[e["agent"]] = True
                elif e["event"] == "lost":
                    state[e["agent"]] = False
        return sum(state.values())

    def events_since(self, t0: float) -> list[dict]:
        with open(self.events) as f:
            return [e for e in map(json.loads, f) if e["t"] >= t0]

    def wait_all(self, timeout: float, what: str) -> float:
        t0 = time.monotonic()
        wait_until(lambda: self.registered_now() >= self.args.agents, timeout, what, interval=0.5)
        return time.monotonic() - t0

    def run(self) -> dict:
        args = self.args
        self.start_relays()
        customer = self.relays[0].create_customer("swarm")
        (self.work / "jwt").write_text(self.relays[0].jwt("--customer-id", customer))
        self.events.touch()

        # 1. register N agents, creating N resources.
        t0 = time.monotonic()
        self.start_swarms(args.create_concurrency)
        self.results["first_registration_s"] = round(self.wait_all(args.timeout, "every agent registered"), 1)
        print(f"registered {args.agents} agents (and resources) in {self.results['first_registration_s']} s",
              flush=True)
        self.stop_swarms()

        # 2. memory per idle link: fresh relays with every endpoint bound, then the links.
        for relay in self.relays:
            relay.stop()
        self.start_relays()
        wait_until(lambda: all(len(self.admin(r).list_resources()) >= args.agents for r in self.relays[:1]), 60,
                   "resources listed")
        time.sleep(5)  # let the relays settle (heap, first heartbeats) before the baseline
        baseline = [rss_kib(r.proc.pid) for r in self.relays]
        self.events.write_text("")
        t0 = time.monotonic()
        self.start_swarms()
        self.results["registration_s"] = round(self.wait_all(args.timeout, "every agent linked again"), 1)
        time.sleep(10)  # idle: keepalives only
        loaded = [rss_kib(r.proc.pid) for r in self.relays]
        links = []
        for relay in self.relays:
            status = self.admin(relay).cluster_status()
            me = status["relay_id"]
            links.append(sum(1 for link in status["links"] if link["relay_id"] == me))
        per_link = [round((after - before) / n, 1) if n else None for before, after, n in zip(baseline, loaded, links)]
        self.results["memory"] = {"baseline_rss_kib": baseline, "rss_with_links_kib": loaded, "links": links,
                                  "kib_per_idle_link": per_link}
        print(f"relay RSS per idle agent link (KiB): {per_link} (links {links}, baseline {baseline} KiB, "
              f"with links {loaded} KiB)", flush=True)

        # 3. admin: resources list with N resources.
        timings = {}
        for relay in self.relays:
            client = self.admin(relay)
            samples = []
            for _ in range(5):
                t = time.perf_counter()
                rows = client.list_resources()
                samples.append(time.perf_counter() - t)
            assert len(rows) >= args.agents
            timings[relay.host] = {"median_ms": round(statistics.median(samples) * 1000, 1),
                                   "max_ms": round(max(samples) * 1000, 1)}
        self.results["resources_list"] = timings
        print(f"resources list ({args.agents} resources): {timings}", flush=True)

        # 4. restart: SIGKILL, then SIGTERM (drain).
        for name, sig in (("kill", signal.SIGKILL), ("drain", signal.SIGTERM)):
            victim = self.relays[0]
            on_victim = self.results["memory"]["links"][0] if name == "kill" else None
            t0 = time.time()
            others = {r.proc.pid: cpu_seconds(r.proc.pid) for r in self.relays[1:]}
            self.restart(victim, sig)
            back = self.wait_all(args.timeout, f"every agent back after the {name}")
            # CPU per registration, the figure a loaded machine does not blur: the restarted
            # relay's (its start included) after the kill, the other relays' after the drain.
            cpu = (cpu_seconds(victim.proc.pid) if name == "kill"
                   else sum(cpu_seconds(pid) - before for pid, before in others.items()))
            events = [e for e in self.events_since(t0) if e["event"] == "registered"]
            per_second = collections.Counter(int(e["t"] - t0) for e in events)
            self.results[f"restart_{name}"] = {
                "registrations": len(events), "all_back_s": round(time.time() - t0, 1),
                "busiest_second": max(per_second.values()) if per_second else 0,
                "per_second": [per_second.get(s, 0) for s in range(max(per_second) + 1)] if per_second else [],
                "links_on_the_restarted_relay_before": on_victim,
                "relay_cpu_ms_per_registration": round(1000 * cpu / max(1, len(events)), 2),
                "load_average": loadavg(),
            }
            print(f"restart ({name}): {len(events)} registrations, all back in {back:.1f} s after the restart "
                  f"began {round(time.time() - t0, 1)} s ago; busiest second {self.results[f'restart_{name}']['busiest_second']}, "
                  f"relay CPU {self.results[f'restart_{name}']['relay_cpu_ms_per_registration']} ms per registration",
                  flush=True)
        self.results["load_average_after"] = loadavg()
        return self.results

    def close(self) -> None:
        self.stop_swarms()
        for relay in self.relays:
            relay.stop()
        self.pg.destroy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=10000)
    parser.add_argument("--swarms", type=int, default=4, help="simulated-agent processes")
    parser.add_argument("--timeout", type=float, default=300, help="longest wait for a phase")
    parser.add_argument("--create-concurrency", type=int, metavar="N",
                        help="handshakes in flight per swarm while the agents first register and create "
                             "their resources (default the swarm's): fewer keeps the relays' queries on the "
                             "customer's row within their timeout at 10,000")
    parser.add_argument("--out", help="write the figures here as JSON")
    args = parser.parse_args()
    def interrupted(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)  # stopped: still clean up (relays, swarms, PostgreSQL)
    work = Path(tempfile.mkdtemp(prefix="cluster-scale-"))
    print(f"load average before: {loadavg()}; work directory {work}", flush=True)
    bench = Bench(args, work)
    try:
        results = bench.run()
    finally:
        bench.close()
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
