#!/usr/bin/env python3
"""End-to-end benchmark: our tunnel against direct TCP and OpenSSH ``ssh -R``, in one run.

    python bench/e2e.py                 # full run (~14 minutes on 2 cores, ~7 of them WAN)
    python bench/e2e.py --quick         # short durations (~7 minutes)
    python bench/e2e.py --smoke         # every step once, briefly (the tests' check of the harness)
    python bench/e2e.py --systems direct,tunnel-wss --metrics rtt,throughput
    python bench/e2e.py --metrics wan --wan-loss 1     # the WAN path alone, 1 % loss

Every SYSTEM gives the "integration worker" a loopback host:port that forwards to a private
service of its own (echo server, iperf3 server, nginx):

    direct          the service port itself
    ssh-default     ``ssh -R`` through a private sshd, OpenSSH's default cipher
    ssh-aes128gcm   the same with ``-c aes128-gcm@openssh.com``
    stunnel         stunnel4 on both sides: TLS 1.3 AES-128-GCM in C, one TLS connection per
                    worker connection, no multiplexing (what TLS alone costs; not in the WAN group)
    tunnel-wss      our relay + agent over TLS WebSocket
    tunnel-quic     our relay + agent over QUIC
    tunnel-auto     our relay + agent with ``RELAY_URL=auto://`` (the default a user meets; only
                    when named in --systems)

The agent-equivalent (ssh client / tunnel-agent) is the process whose RSS and CPU are read,
and, in the ``capped`` group, the one held to ``--cap-cores`` of a core (cgroup CPU quota: the
800 MHz-class host). The ``wan`` group runs every system again across a packet-level path
between two network namespaces (``bench/wan``: delay, rate limit, loss) at each ``--wan-loss``.
Results: a table on stdout (values, then ratios to ssh-aes128gcm, to stunnel and to direct),
``bench/results/latest.json`` and ``bench/results/latest.png``. See bench/E2E.md.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.peers import clients, cpucap, pgbench  # noqa: E402
from bench.peers.procs import (LOOPBACK, HarnessError, ProcessRegistry, cpu_hz,  # noqa: E402
                               cpu_model, cpu_seconds, install_signal_handlers, raise_fd_limit,
                               rss_bytes)
from bench.peers.services import start_services  # noqa: E402
from bench.peers.sshd import PrivateSshd, ssh_available  # noqa: E402
from bench.peers.stunnel import Stunnel, stunnel_available  # noqa: E402
from bench.peers.ours import OurRelay, ours_available  # noqa: E402
from bench.wan import measure as wan  # noqa: E402
from bench.wan.path import unavailable_reason as wan_unavailable  # noqa: E402

SYSTEMS = ["direct", "ssh-default", "ssh-aes128gcm", "stunnel", "tunnel-wss", "tunnel-quic",
           "tunnel-auto"]
OPT_IN = {"tunnel-auto"}  # run only when named
REFERENCE = "ssh-aes128gcm"
SSH_CIPHERS = {"ssh-default": None, "ssh-aes128gcm": "aes128-gcm@openssh.com"}
OUR_TRANSPORTS = {"tunnel-wss": "wss", "tunnel-quic": "quic", "tunnel-auto": "auto"}


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    group: str
    agent_only: bool = False


METRICS = [
    Metric("tput_1", "throughput, 1 stream", "Gbit/s", True, "throughput"),
    Metric("tput_1_rev", "throughput, 1 stream, service->worker", "Gbit/s", True, "throughput"),
    Metric("tput_16", "throughput, 16 streams", "Gbit/s", True, "throughput"),
    Metric("agent_cpu_s_per_gb", "agent CPU per GB (1 stream)", "s/GB", False, "throughput", True),
    Metric("agent_cycles_per_byte", "agent cycles per byte", "cycles/B", False, "throughput", True),
    Metric("relay_cpu_s_per_gb", "relay-side CPU per GB (1 stream: relay, sshd, stunnel's worker side)", "s/GB",
           False, "throughput", True),
    Metric("rtt_p50", "64 B round trip p50", "us", False, "rtt"),
    Metric("rtt_p99", "64 B round trip p99", "us", False, "rtt"),
    Metric("conn_rate_1", "new connections/s, sequential", "conn/s", True, "connrate"),
    Metric("conn_rate_8", "new connections/s, 8 parallel", "conn/s", True, "connrate"),
    Metric("http_rps", "HTTP requests/s (wrk -t2 -c32)", "req/s", True, "http"),
    Metric("http_p50", "HTTP latency p50", "ms", False, "http"),
    Metric("http_p99", "HTTP latency p99", "ms", False, "http"),
    Metric("redis_set_rps", "redis-benchmark SET (-P 16, 50 clients)", "req/s", True, "redis"),
    Metric("redis_get_rps", "redis-benchmark GET (-P 16, 50 clients)", "req/s", True, "redis"),
    Metric("redis_agent_cpu_us", "redis-benchmark: agent CPU per request", "us", False, "redis", True),
    Metric("redis_relay_cpu_us", "redis-benchmark: relay-side CPU per request", "us", False, "redis", True),
    Metric("agent_rss_idle", "agent RSS idle", "MB", False, "streams", True),
    Metric("agent_rss_1000", "agent RSS, 1,000 streams", "MB", False, "streams", True),
    Metric("streams_1000_ok", "streams completed of 1,000", "count", True, "streams"),
    Metric("streams_1000_rtt_max", "1,000 streams: slowest round trip", "ms", False, "streams"),
    Metric("pg_select_tps", "pgbench select-only (8 clients, scale 5)", "TPS", True, "pgbench"),
    Metric("pg_tpcb_tps", "pgbench TPC-B-like (8 clients, scale 5)", "TPS", True, "pgbench"),
    Metric("capped_tput_1", "agent capped: throughput, 1 stream", "Gbit/s", True, "capped"),
    Metric("capped_rtt_p50", "agent capped: 64 B round trip p50", "us", False, "capped"),
    Metric("capped_rtt_p99", "agent capped: 64 B round trip p99", "us", False, "capped"),
]
METRIC_BY_KEY = {m.key: m for m in METRICS}
GROUPS = ["rtt", "connrate", "throughput", "http", "redis", "pgbench", "streams", "capped", "wan"]
GROUP_SERVICES = {"rtt": {"echo"}, "connrate": {"echo"}, "streams": {"echo"},
                  "throughput": {"iperf"}, "http": {"http"}, "redis": {"redis"}, "capped": {"iperf", "echo"},
                  "pgbench": set()}  # one PostgreSQL for the whole run (main)


def add_wan_metrics(losses) -> None:
    """Register the WAN metrics of each loss rate (a fraction) after the others."""
    for loss in losses:
        for key, (label, unit, higher) in wan.metric_keys(loss).items():
            if key not in METRIC_BY_KEY:
                METRICS.append(Metric(key, label, unit, higher, "wan"))
                METRIC_BY_KEY[key] = METRICS[-1]


add_wan_metrics(wan.WanSettings().losses)


@dataclass
class Settings:
    tput_seconds: int
    rtt_count: int
    conn_seconds: float
    http_seconds: int
    streams: int
    wan: wan.WanSettings
    pg_seconds: int = 10
    cap_cores: float = 0.31
    redis_requests: int = 1_000_000

    @classmethod
    def for_mode(cls, quick: bool, smoke: bool = False) -> "Settings":
        if smoke:
            # Every step once, as short as it still measures: proves the harness runs (the tests
            # run it so), not a figure to publish.
            return cls(tput_seconds=1, rtt_count=200, conn_seconds=0.5, http_seconds=1, streams=100,
                       pg_seconds=1, redis_requests=20_000,
                       wan=wan.WanSettings(tput_seconds=2, hol_seconds=4, hol_warmup=1.0))
        if quick:
            return cls(tput_seconds=2, rtt_count=2000, conn_seconds=1.5, http_seconds=2,
                       streams=1000, pg_seconds=4, redis_requests=200_000,
                       wan=wan.WanSettings(tput_seconds=5, hol_seconds=8, hol_warmup=2.0))
        return cls(tput_seconds=10, rtt_count=20000, conn_seconds=5.0, http_seconds=10,
                   streams=1000, wan=wan.WanSettings())


class Progress:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self, system: str, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:7.1f}s] {system:<14} {msg}", file=sys.stderr,
              flush=True)


@dataclass
class Results:
    values: dict[tuple[str, str], float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    notes: dict[str, object] = field(default_factory=dict)   # per group: skipped why, WAN runs

    def put(self, system: str, key: str, value: float) -> None:
        self.values[(system, key)] = float(value)


def fmt(value: float | None, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    a = abs(value)
    if unit == "count" or (a >= 1000 and float(value).is_integer()):
        return f"{value:,.0f}"
    if a >= 100:
        return f"{value:,.0f}"
    if a >= 10:
        return f"{value:.1f}"
    if a >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


# ---------------------------------------------------------------------------------------------
# One system


class Exposure:
    """How one system exposes services: ``expose(service, port) -> (endpoint, agent pid|None)``."""

    def __init__(self, system: str, reg: ProcessRegistry, tmp: Path) -> None:
        self.system = system
        self.reg = reg
        self.tmp = tmp
        self.sshd: PrivateSshd | None = None
        self.relay: OurRelay | None = None
        self.stunnel: Stunnel | None = None
        self.procs: list[subprocess.Popen] = []
        self.worker_sides: dict[str, int] = {}

    def start(self) -> None:
        if self.system in SSH_CIPHERS:
            self.sshd = PrivateSshd(self.reg, self.tmp / "sshd")
            self.sshd.start()
        elif self.system in OUR_TRANSPORTS:
            self.relay = OurRelay(self.reg, self.tmp / "relay-state")
            self.relay.start()
        elif self.system == "stunnel":
            self.stunnel = Stunnel(self.reg, self.tmp / "stunnel")
            self.stunnel.start()

    def expose(self, service: str, port: int) -> tuple[int, int | None]:
        if self.system == "direct":
            return port, None
        if self.sshd is not None:
            ep, proc = self.sshd.forward(port, SSH_CIPHERS[self.system], name=f"ssh-{service}")
        elif self.stunnel is not None:
            ep, proc, worker_side = self.stunnel.forward(port, name=f"stunnel-{service}")
            self.procs.append(worker_side)
            self.worker_sides[service] = worker_side.pid
        else:
            assert self.relay is not None
            ep, proc = self.relay.expose(f"bench-{service}", port, OUR_TRANSPORTS[self.system])
        self.procs.append(proc)
        return ep, proc.pid

    def relay_side_pid(self, service: str) -> int | None:
        """The process on the workers' side that ``service``'s bytes cross (the relay, sshd with
        its session processes, stunnel's worker side); None for direct."""
        if self.relay is not None and self.relay.proc is not None:
            return self.relay.proc.pid
        if self.sshd is not None and self.sshd.proc is not None:
            return self.sshd.proc.pid
        return self.worker_sides.get(service)

    def stop(self) -> None:
        self.reg.stop_all(self.procs)
        self.procs.clear()
        if self.sshd is not None:
            self.sshd.stop()
        if self.relay is not None:
            self.relay.stop()


class Profiler:
    """py-spy flame graphs of our agent (and relay) during chosen steps (``--profile DIR``)."""

    def __init__(self, reg: ProcessRegistry, out_dir: Path | None, say: Progress) -> None:
        self.reg = reg
        self.out_dir = out_dir
        self.say = say
        self.exe = shutil.which("py-spy")

    def __call__(self, system: str, step: str, pids: dict[str, int | None]):
        import contextlib

        @contextlib.contextmanager
        def cm():
            procs = []
            if self.out_dir is not None and self.exe and system in OUR_TRANSPORTS:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                for role, pid in pids.items():
                    if not pid:
                        continue
                    svg = self.out_dir / f"{system}-{step}-{role}.svg"
                    procs.append((svg, self.reg.spawn(
                        [self.exe, "record", "--pid", str(pid), "--rate", "200", "--nonblocking",
                         "--format", "flamegraph", "-o", str(svg)], f"py-spy-{role}")))
                time.sleep(0.5)  # let py-spy attach before the load starts
            try:
                yield
            finally:
                for svg, p in procs:
                    if p.poll() is None:
                        p.send_signal(2)  # SIGINT: py-spy writes its output and exits
                for svg, p in procs:
                    try:
                        p.wait(15)
                    except subprocess.TimeoutExpired:
                        pass
                    self.reg.stop(p)
                    if svg.exists():
                        self.say(system, f"  profile written: {svg}")
        return cm()


def measure_system(system: str, groups: list[str], st: Settings, reg: ProcessRegistry,
                   res: Results, say: Progress, hz: float,
                   profiler: "Profiler | None" = None, database: "pgbench.Database | None" = None) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f"{system}-", dir=reg.log_dir))
    needed = set().union(*(GROUP_SERVICES[g] for g in groups))
    say(system, f"starting services ({', '.join(sorted(needed))}) and {system} forwarding")
    svc = start_services(reg, needed, tmp)
    exp = Exposure(system, reg, tmp)
    try:
        exp.start()
        ports = svc.ports()
        endpoints: dict[str, tuple[int, int | None]] = {}
        for name in sorted(needed):
            endpoints[name] = exp.expose(name, ports[name])
        if endpoints:
            say(system, "endpoints " + ", ".join(f"{k}->{LOOPBACK}:{v[0]}" for k, v in endpoints.items()))

        def run(label: str, fn) -> None:
            try:
                fn()
            except HarnessError as e:
                msg = f"{system}: {label}: {e}"
                res.errors.append(msg)
                say(system, f"ERROR {label}: {str(e).splitlines()[0][:200]}")

        def show(*keys: str) -> None:
            if not any((system, k) in res.values for k in keys):
                return
            say(system, "  " + "; ".join(
                f"{METRIC_BY_KEY[k].label} = {fmt(res.values.get((system, k)), METRIC_BY_KEY[k].unit)}"
                f" {METRIC_BY_KEY[k].unit}" for k in keys if (system, k) in res.values))

        echo_ep, echo_pid = endpoints.get("echo", (0, None))
        relay_pid = exp.relay.proc.pid if exp.relay is not None and exp.relay.proc else None
        prof = (lambda step, pids: profiler(system, step, pids)) if profiler else \
            (lambda step, pids: contextlib.nullcontext())
        if "streams" in groups and echo_pid:
            res.put(system, "agent_rss_idle", rss_bytes(echo_pid) / 1e6)
            show("agent_rss_idle")

        if "rtt" in groups:
            say(system, f"64 B round trips x{st.rtt_count}")

            def rtt() -> None:
                r = clients.round_trips(echo_ep, st.rtt_count)
                res.put(system, "rtt_p50", r.p50_us)
                res.put(system, "rtt_p99", r.p99_us)
            with prof("rtt", {"agent": echo_pid, "relay": relay_pid}):
                run("rtt", rtt)
            show("rtt_p50", "rtt_p99")

        if "connrate" in groups:
            for par in (1, 8):
                say(system, f"new connections/s, {par} in parallel, {st.conn_seconds:g}s")

                def rate(par=par) -> None:
                    r = clients.connection_rate(echo_ep, st.conn_seconds, par)
                    if r.errors:
                        res.errors.append(f"{system}: connrate x{par}: {r.errors} failed connections")
                    res.put(system, f"conn_rate_{par}", r.per_second)
                run(f"connrate x{par}", rate)
            show("conn_rate_1", "conn_rate_8")

        if "throughput" in groups:
            ip_ep, ip_pid = endpoints["iperf"]
            say(system, f"iperf3 1 stream, {st.tput_seconds}s")

            def one() -> None:
                side = exp.relay_side_pid("iperf")
                c0 = cpu_seconds(ip_pid) if ip_pid else 0.0
                s0 = cpu_seconds(side) if side else 0.0
                r = clients.iperf3(reg, ip_ep, st.tput_seconds)
                c1 = cpu_seconds(ip_pid) if ip_pid else 0.0
                s1 = cpu_seconds(side) if side else 0.0
                res.put(system, "tput_1", r.bits_per_second / 1e9)
                if side and r.bytes:
                    res.put(system, "relay_cpu_s_per_gb", (s1 - s0) / (r.bytes / 1e9))
                if ip_pid and r.bytes:
                    res.put(system, "agent_cpu_s_per_gb", (c1 - c0) / (r.bytes / 1e9))
                    if hz:
                        res.put(system, "agent_cycles_per_byte", (c1 - c0) * hz / r.bytes)
            with prof("throughput", {"agent": ip_pid, "relay": relay_pid}):
                run("throughput x1", one)
            show("tput_1", "agent_cpu_s_per_gb", "agent_cycles_per_byte", "relay_cpu_s_per_gb")
            say(system, f"iperf3 1 stream reverse (-R), {st.tput_seconds}s")
            run("throughput x1 -R", lambda: res.put(
                system, "tput_1_rev",
                clients.iperf3(reg, ip_ep, st.tput_seconds, reverse=True).bits_per_second / 1e9))
            show("tput_1_rev")
            say(system, f"iperf3 16 streams, {st.tput_seconds}s")
            run("throughput x16", lambda: res.put(
                system, "tput_16",
                clients.iperf3(reg, ip_ep, st.tput_seconds, parallel=16).bits_per_second / 1e9))
            show("tput_16")

        if "http" in groups:
            say(system, f"wrk -t2 -c32 -d{st.http_seconds}s")

            def http() -> None:
                r = clients.wrk(reg, endpoints["http"][0], st.http_seconds)
                if r.errors:
                    res.errors.append(f"{system}: wrk: {r.errors} socket errors / bad responses")
                res.put(system, "http_rps", r.requests_per_second)
                res.put(system, "http_p50", r.p50_ms)
                res.put(system, "http_p99", r.p99_ms)
            run("http", http)
            show("http_rps", "http_p50", "http_p99")

        if "redis" in groups:
            say(system, f"redis-benchmark -t set,get -P 16 -c 50 -n {st.redis_requests}")

            def redis() -> None:
                port, agent = endpoints["redis"]
                side = exp.relay_side_pid("redis")
                a0, s0 = (cpu_seconds(agent) if agent else 0.0), (cpu_seconds(side) if side else 0.0)
                rates = clients.redis_benchmark(reg, port, st.redis_requests)
                res.put(system, "redis_set_rps", rates["SET"])
                res.put(system, "redis_get_rps", rates["GET"])
                requests = 2 * st.redis_requests  # SET and GET
                if agent:
                    res.put(system, "redis_agent_cpu_us", (cpu_seconds(agent) - a0) / requests * 1e6)
                if side:
                    res.put(system, "redis_relay_cpu_us", (cpu_seconds(side) - s0) / requests * 1e6)
            run("redis", redis)
            show("redis_set_rps", "redis_get_rps", "redis_agent_cpu_us", "redis_relay_cpu_us")

        if "pgbench" in groups and database is not None:
            pg_ep, _ = exp.expose("postgres", database.port)
            say(system, f"pgbench select-only and TPC-B-like, {pgbench.CLIENTS} clients, {st.pg_seconds}s each")
            run("pgbench select-only", lambda: res.put(
                system, "pg_select_tps", database.run(LOOPBACK, pg_ep, st.pg_seconds, select_only=True)))
            run("pgbench tpc-b", lambda: res.put(
                system, "pg_tpcb_tps", database.run(LOOPBACK, pg_ep, st.pg_seconds, select_only=False)))
            show("pg_select_tps", "pg_tpcb_tps")

        if "streams" in groups:
            say(system, f"{st.streams} concurrent streams")

            def streams() -> None:
                r = clients.concurrent_streams(
                    echo_ep, st.streams, (lambda: rss_bytes(echo_pid)) if echo_pid else None)
                res.put(system, "streams_1000_ok", r.ok)
                res.put(system, "streams_1000_rtt_max", r.rtt_all_max_ms)
                if echo_pid:
                    res.put(system, "agent_rss_1000", r.peak_rss / 1e6)
                if r.ok != r.wanted:
                    res.errors.append(f"{system}: only {r.ok} of {r.wanted} streams completed")
            run("streams", streams)
            show("streams_1000_ok", "agent_rss_1000", "streams_1000_rtt_max")

        if "capped" in groups and endpoints["iperf"][1]:
            ip_ep, ip_pid = endpoints["iperf"]
            say(system, f"agent capped at {st.cap_cores:g} core: iperf3 1 stream, "
                        f"{st.tput_seconds}s; 64 B round trips x{st.rtt_count}")

            def capped_tput() -> None:
                with cpucap.CpuCap(st.cap_cores) as cap:
                    cap.add(ip_pid)
                    r = clients.iperf3(reg, ip_ep, st.tput_seconds, name="iperf3-capped")
                res.put(system, "capped_tput_1", r.bits_per_second / 1e9)

            def capped_rtt() -> None:
                with cpucap.CpuCap(st.cap_cores) as cap:
                    cap.add(echo_pid)
                    r = clients.round_trips(echo_ep, st.rtt_count)
                res.put(system, "capped_rtt_p50", r.p50_us)
                res.put(system, "capped_rtt_p99", r.p99_us)
            run("capped throughput", capped_tput)
            run("capped rtt", capped_rtt)
            show("capped_tput_1", "capped_rtt_p50", "capped_rtt_p99")
    finally:
        say(system, "stopping")
        exp.stop()
        reg.stop_all(svc.procs)


# ---------------------------------------------------------------------------------------------
# Output


def ratio_table(res: Results, systems: list[str], ref: str, keys: list[str]) -> list[str]:
    lines = [f"| metric | {' | '.join(systems)} |", "|---|" + "---:|" * len(systems)]
    for k in keys:
        m = METRIC_BY_KEY[k]
        base = res.values.get((ref, k))
        cells = []
        for s in systems:
            v = res.values.get((s, k))
            cells.append("n/a" if v is None or not base else f"{v / base:.2f}x")
        if all(c == "n/a" for c in cells):
            continue
        lines.append(f"| {m.label} ({'higher' if m.higher_is_better else 'lower'} is better) | "
                     + " | ".join(cells) + " |")
    return lines


def tables(res: Results, systems: list[str]) -> str:
    keys = [m.key for m in METRICS if any((s, m.key) in res.values for s in systems)]
    out = ["| metric | unit | " + " | ".join(systems) + " |",
           "|---|---|" + "---:|" * len(systems)]
    for k in keys:
        m = METRIC_BY_KEY[k]
        arrow = "↑" if m.higher_is_better else "↓"
        out.append(f"| {m.label} {arrow} | {m.unit} | "
                   + " | ".join(fmt(res.values.get((s, k)), m.unit) for s in systems) + " |")
    text = "\n".join(out)
    if REFERENCE in systems:
        text += f"\n\nRatio to `{REFERENCE}`:\n\n" + "\n".join(ratio_table(res, systems, REFERENCE, keys))
    if "stunnel" in systems:
        text += "\n\nRatio to `stunnel` (TLS in C, no multiplexing):\n\n" + "\n".join(
            ratio_table(res, systems, "stunnel", keys))
    if "direct" in systems:
        text += "\n\nRatio to `direct`:\n\n" + "\n".join(ratio_table(res, systems, "direct", keys))
    return text


def _version(argv: list[str]) -> str:
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return (cp.stdout + cp.stderr).strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def metadata(args, st: Settings, res: Results, systems: list[str], groups: list[str],
             hz: float, seconds: float) -> dict:
    commit = _version(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    try:
        from tunnel import __version__ as ours
    except Exception:  # noqa: BLE001
        ours = "unknown"
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "mode": "smoke" if args.smoke else "quick" if args.quick else "full",
        "systems": systems, "groups": groups, "reference": REFERENCE,
        "skipped": res.skipped, "errors": res.errors, "notes": res.notes,
        "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "cpu_hz_nominal": hz,
        "kernel": platform.release(), "machine": platform.machine(),
        "load_average_at_start": res.notes.get("load_average_at_start"),
        "settings": asdict(st), "wall_seconds": round(seconds, 1),
        "versions": {
            "python": platform.python_version(), "tunnel": ours, "git_commit": commit,
            "openssh": _version(["ssh", "-V"]), "iperf3": _version(["iperf3", "--version"]),
            "nginx": _version(["nginx", "-v"]), "wrk": _version(["wrk", "-v"]),
        },
    }


def chart(res: Results, systems: list[str], path: Path, title: str) -> bool:
    """Horizontal grouped bars: each system's advantage over the reference per metric
    (value/ref when higher is better, ref/value when lower is better; > 1 = better)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ref = REFERENCE if REFERENCE in systems else systems[0]
    keys = [m.key for m in METRICS if res.values.get((ref, m.key))
            and any((s, m.key) in res.values for s in systems if s != ref)]
    if not keys:
        return False
    n = len(systems)
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.18 * n * len(keys)))
    height = 0.8 / n
    lo, hi = 1.0, 1.0
    colors = {"direct": "#9e9e9e", "ssh-default": "#f4a261", "ssh-aes128gcm": "#e76f51",
              "stunnel": "#8d99ae", "tunnel-wss": "#2a9d8f", "tunnel-quic": "#264653",
              "tunnel-auto": "#8ab17d"}
    for i, s in enumerate(systems):
        ys, xs = [], []
        for j, k in enumerate(keys):
            v, base = res.values.get((s, k)), res.values[(ref, k)]
            if v is None or v <= 0:
                continue
            ys.append(j + (i - (n - 1) / 2) * height)
            xs.append(v / base if METRIC_BY_KEY[k].higher_is_better else base / v)
        ax.barh(ys, [x - 1.0 for x in xs], height, left=1.0, label=s, color=colors.get(s))
        for y, x in zip(ys, xs):
            ax.text(x * (1.04 if x >= 1 else 0.96), y, f"{x:.2f}x", va="center",
                    ha="left" if x >= 1 else "right", fontsize=6)
        lo, hi = min([lo] + xs), max([hi] + xs)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlim(lo / 1.6, hi * 1.6)
    ax.set_yticks(range(len(keys)))
    ax.set_yticklabels([f"{METRIC_BY_KEY[k].label} ({'↑' if METRIC_BY_KEY[k].higher_is_better else '↓'})"
                        for k in keys], fontsize=8)
    ax.invert_yaxis()
    ax.grid(axis="x", which="both", alpha=0.3)
    ax.set_xlabel(f"advantage over {ref} (log scale; > 1 = better: value/{ref} for ↑ metrics, "
                  f"{ref}/value for ↓ metrics)", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------


def chart_title(meta: dict) -> str:
    return (f"e2e {meta['mode']} run {meta['date'][:16]}Z on {meta['cpu_model']} x{meta['cpu_count']}"
            f" (commit {meta['versions']['git_commit']})")


def replot(json_path: Path, out_dir: Path) -> int:
    data = json.loads(Path(json_path).read_text())
    meta = data["metadata"]
    res = Results(skipped=dict(meta.get("skipped", {})), errors=list(meta.get("errors", [])))
    add_wan_metrics(meta.get("settings", {}).get("wan", {}).get("losses", ()))
    for row in data["rows"]:
        if row["metric"] in METRIC_BY_KEY:
            res.put(row["system"], row["metric"], row["value"])
    ran = [s for s in SYSTEMS if any(k[0] == s for k in res.values)]
    print(tables(res, ran))
    ppath = out_dir / "latest.png"
    if chart(res, ran, ppath, chart_title(meta)):
        print(f"\nwrote {ppath}", file=sys.stderr)
    return 0


def parse_list(text: str | None, allowed: list[str], what: str) -> list[str]:
    if not text:
        return list(allowed)
    picked = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in picked if x not in allowed]
    if bad:
        raise SystemExit(f"unknown {what}: {', '.join(bad)} (choose from {', '.join(allowed)})")
    return [x for x in allowed if x in picked]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short durations (about 7 minutes)")
    ap.add_argument("--smoke", action="store_true",
                    help="each step once, as short as possible: checks the harness, figures not comparable")
    ap.add_argument("--systems", help=f"comma list of {', '.join(SYSTEMS)} (default: all but tunnel-auto)")
    ap.add_argument("--metrics", help=f"comma list of metric groups {', '.join(GROUPS)} "
                                      "(default: all)")
    ap.add_argument("--results-dir", type=Path, default=REPO / "bench" / "results",
                    help="where latest.json and latest.png go")
    ap.add_argument("--no-save", action="store_true", help="print the table only")
    ap.add_argument("--keep-logs", action="store_true", help="keep the temp dir with all logs")
    ap.add_argument("--profile", type=Path, metavar="DIR",
                    help="record py-spy flame graphs of our agent and relay during the round-trip "
                         "and 1-stream throughput steps into DIR (pip install py-spy)")
    ap.add_argument("--cap-cores", type=float, default=0.31,
                    help="CPU quota of the agent (and ssh client) in the capped group, in cores "
                         "(default 0.31: an 800 MHz-class host)")
    ap.add_argument("--wan-loss", default="0,0.1,1",
                    help="comma list of random loss rates for the WAN group, in percent "
                         "(default 0,0.1,1)")
    ap.add_argument("--wan-rtt", type=float, default=50.0, help="WAN round trip, ms (default 50)")
    ap.add_argument("--wan-rate", type=float, default=1000.0,
                    help="WAN bottleneck rate, Mbit/s (default 1000)")
    ap.add_argument("--wan-cc", metavar="ALGO",
                    help="TCP congestion control inside the WAN namespaces (default: the "
                         "host's; only those in net.ipv4.tcp_allowed_congestion_control)")
    ap.add_argument("--replot", type=Path, metavar="JSON",
                    help="measure nothing: print the table and redraw the chart from a results "
                         "JSON (e.g. bench/results/latest.json)")
    args = ap.parse_args(argv)
    if args.replot:
        return replot(args.replot, args.results_dir)
    systems = parse_list(args.systems, SYSTEMS, "systems")
    if not args.systems:
        systems = [s for s in systems if s not in OPT_IN]
    groups = parse_list(args.metrics, GROUPS, "metric groups")
    st = Settings.for_mode(args.quick, args.smoke)
    st.cap_cores = args.cap_cores
    try:
        losses = tuple(float(x) / 100 for x in args.wan_loss.split(",") if x.strip())
    except ValueError:
        raise SystemExit(f"--wan-loss: not a comma list of percentages: {args.wan_loss!r}")
    st.wan.losses, st.wan.rtt_ms, st.wan.rate_mbit = losses, args.wan_rtt, args.wan_rate
    st.wan.congestion_control = args.wan_cc
    add_wan_metrics(losses)

    install_signal_handlers()
    raise_fd_limit()
    workdir = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    reg = ProcessRegistry(workdir)
    atexit.register(reg.close)
    say = Progress()
    res = Results()
    hz = cpu_hz()
    interrupted = False
    res.notes["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    if "capped" in groups and (why := cpucap.unavailable_reason()):
        res.notes["capped"] = f"skipped: {why}"
        say("capped", f"SKIPPED: {why}")
        groups.remove("capped")
    if "wan" in groups and (why := wan_unavailable()):
        res.notes["wan"] = f"skipped: {why}"
        say("wan", f"SKIPPED: {why}")
        groups.remove("wan")
    local_groups = [g for g in groups if g != "wan"]
    database = None
    try:
        if "pgbench" in local_groups:
            say("pgbench", f"starting PostgreSQL, pgbench -i -s {pgbench.SCALE}")
            try:
                database = pgbench.Database()
            except (HarnessError, RuntimeError, OSError) as e:
                res.notes["pgbench"] = f"skipped: {e}"
                say("pgbench", f"SKIPPED: {e}")
        if "redis" in local_groups and not (shutil.which("redis-server") and shutil.which("redis-benchmark")):
            res.notes["redis"] = "skipped: redis-server or redis-benchmark not installed (scripts/setup.sh)"
            say("redis", "SKIPPED: redis-server or redis-benchmark not installed")
            local_groups.remove("redis")
        missing = [t for t in ("iperf3", "wrk", "nginx") if not shutil.which(t)
                   and not os.path.exists(f"/usr/sbin/{t}")]
        if missing:
            raise SystemExit(f"missing tools: {', '.join(missing)} (run scripts/setup.sh)")
        ours_reason = None
        if any(s in OUR_TRANSPORTS for s in systems):
            ours_reason = ours_available(reg)
        ssh_reason = ssh_available() if any(s in SSH_CIPHERS for s in systems) else None
        for system in systems:
            reason = (ours_reason if system in OUR_TRANSPORTS else
                      ssh_reason if system in SSH_CIPHERS else
                      stunnel_available() if system == "stunnel" else None)
            if reason:
                res.skipped[system] = reason
                say(system, f"SKIPPED: {reason}")
        runnable = [s for s in systems if s not in res.skipped]
        for system in runnable if local_groups else []:
            try:
                measure_system(system, local_groups, st, reg, res, say, hz,
                               Profiler(reg, args.profile, say) if args.profile else None, database)
            except HarnessError as e:
                res.skipped[system] = f"setup failed: {str(e).splitlines()[0][:300]}"
                res.errors.append(f"{system}: setup failed: {e}")
                say(system, f"SKIPPED (setup failed): {str(e).splitlines()[0][:200]}")
        # On the WAN the cipher does not matter (ssh's channel window does): without an
        # explicit --systems, ssh-aes128gcm alone stands for ssh -R there.
        # stunnel has no place on the WAN path (bench/wan runs ssh and ours only).
        wan_systems = [s for s in runnable if (args.systems or s != "ssh-default") and s != "stunnel"]
        if "wan" in groups and wan_systems:
            res.notes["wan"] = wan.measure(wan_systems, st.wan, reg, res.put, say, res.errors)
    except KeyboardInterrupt:
        interrupted = True
        say("harness", "interrupted: cleaning up")
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        res.errors.append("harness crashed: " + traceback.format_exc().splitlines()[-1])
    finally:
        if database is not None:
            database.close()
        reg.close()

    seconds = time.monotonic() - say.t0
    ran = [s for s in systems if s not in res.skipped]
    print()
    print(tables(res, ran) if ran else "(no system ran)")
    if res.skipped:
        print("\nSkipped: " + "; ".join(f"{s}: {r}" for s, r in res.skipped.items()))
    if res.errors:
        print("\nErrors:\n  " + "\n  ".join(e.splitlines()[0] for e in res.errors))
    if not args.no_save and ran and not interrupted:
        meta = metadata(args, st, res, systems, groups, hz, seconds)
        rows = [{"system": s, "metric": k, "value": v, "unit": METRIC_BY_KEY[k].unit}
                for (s, k), v in sorted(res.values.items(),
                                        key=lambda x: (SYSTEMS.index(x[0][0]),
                                                       list(METRIC_BY_KEY).index(x[0][1])))]
        args.results_dir.mkdir(parents=True, exist_ok=True)
        jpath = args.results_dir / "latest.json"
        jpath.write_text(json.dumps({"metadata": meta, "rows": rows}, indent=1) + "\n")
        (args.results_dir / "latest.md").write_text(tables(res, ran) + "\n")
        ppath = args.results_dir / "latest.png"
        made = chart(res, ran, ppath, chart_title(meta))
        print(f"\nwrote {jpath}" + (f" and {ppath}" if made else ""), file=sys.stderr)
    if args.keep_logs or res.errors:
        print(f"logs kept in {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 130 if interrupted else 1 if args.smoke and res.errors else 0


if __name__ == "__main__":
    sys.exit(main())
