"""CPU per 64-byte round trip of our relay and agent over WSS (or QUIC), one source tree or several
interleaved (A/B).

    python bench/roundtrip_cpu.py                                  # this tree, 3 runs
    python bench/roundtrip_cpu.py --trees /tmp/base,. --runs 4     # A, B, A, B, ...
    python bench/roundtrip_cpu.py --trees .,.:pure                 # compiled, then the twins
    python bench/roundtrip_cpu.py --trees .,.:ssl                  # TLS engines: openssl, ssl

Each run starts, from the tree under test (``python -m relay`` / ``python -m agent`` with
``PYTHONPATH`` and the working directory set to it): a relay on loopback, the echo service,
an agent over WSS serving it; waits for the resource, settles, reads the agent's idle RSS,
then makes ``--count`` sequential 64-byte round trips through the relay's endpoint (after
a warm-up) and reads utime+stime of the agent and the relay from ``/proc/PID/stat`` around
them. Printed per run: load average before it, p50/p99 of the round trip, CPU µs per round
trip of each process, agent idle VmRSS; then the medians per tree.

A tree written ``PATH:pure`` runs with ``TUNNEL_PURE_PYTHON=1`` (the pure-Python twins),
``PATH:ssl`` with ``TUNNEL_TLS_ENGINE=ssl`` (the event loop's TLS transport), ``PATH:quic``
and ``PATH:auto`` with the agent on ``quic://`` or ``auto://`` instead of ``wss://``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.peers.clients import round_trips  # noqa: E402
from bench.peers.procs import (  # noqa: E402
    LOOPBACK, HarnessError, ProcessRegistry, cpu_seconds, free_port, log_tail, python, rss_bytes,
    wait_listening, wait_until,
)
from bench.peers.services import start_echo  # noqa: E402


class Tree:
    """A source tree to run relay and agent from, compiled or as pure-Python twins."""

    def __init__(self, spec: str) -> None:
        path, _, mode = spec.partition(":")
        self.path = Path(path).resolve()
        self.pure = mode == "pure"
        self.ssl_engine = mode == "ssl"
        self.carrier = mode if mode in ("quic", "auto") else "wss"
        suffix = f":{mode}" if mode in ("pure", "ssl", "quic", "auto") else ""
        self.name = self.path.name + suffix
        self.label = str(self.path) + suffix

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("TUNNEL_PURE_PYTHON", "TUNNEL_TLS_ENGINE")}
        env.update(PYTHONPATH=str(self.path), PYTHONUNBUFFERED="1")
        if self.pure:
            env["TUNNEL_PURE_PYTHON"] = "1"
        if self.ssl_engine:
            env["TUNNEL_TLS_ENGINE"] = "ssl"
        env.update(extra or {})
        return env


def _relay_cmd(reg: ProcessRegistry, tree: Tree, state: Path, *args: str) -> str:
    cp = reg.run([python(), "-m", "relay", "--state-dir", str(state), *args], "relay-cmd", timeout=60,
                 env=tree.env(), cwd=tree.path)
    if cp.returncode != 0:
        raise HarnessError(f"relay {' '.join(args[:2])}: {cp.stderr.strip()[-300:]}")
    return cp.stdout.strip()


def profiler_argv(profiler: str, out: Path, pid: int) -> list[str]:
    """The command that records a profile of ``pid`` into ``out``.*: ``py-spy`` (native frames),
    ``perf`` (cpu-clock, frame pointers) or ``perf-dwarf`` (DWARF call graphs)."""
    if profiler.startswith("perf"):
        graph = ["--call-graph", "dwarf,16384"] if profiler == "perf-dwarf" else ["-g"]
        return ["perf", "record", "-e", "cpu-clock", "-F", "1000", *graph, "-o", f"{out}.perf", "-p", str(pid)]
    return ["py-spy", "record", "--native", "--rate", "250", "--format", "raw", "-o", f"{out}.txt",
            "-p", str(pid)]


@contextlib.contextmanager
def tunnel(reg: ProcessRegistry, tree: Tree, name: str, service_port: int, prefix: str, scheme: str | None = None,
           agent_env: dict[str, str] | None = None):
    """A relay on loopback and an agent over ``scheme`` (``wss``, ``quic`` or ``auto``; by
    default ``tree.carrier``; both from ``tree``, the agent with ``agent_env`` added) serving
    ``service_port`` as resource ``name``; yields ``(relay, agent, endpoint port)`` once the
    resource is AVAILABLE, stops both after."""
    import json

    state = Path(tempfile.mkdtemp(prefix=prefix))
    port, admin = free_port(), free_port()
    relay = reg.spawn([python(), "-m", "relay", "serve", "--state-dir", str(state), "--listen",
                       f"{LOOPBACK}:{port}", "--admin-listen", f"{LOOPBACK}:{admin}",
                       "--service-host", LOOPBACK], "relay", env=tree.env(), cwd=tree.path)
    agent = None
    try:
        wait_until(lambda: (state / "admin.json").exists(), 30, "relay admin.json", lambda: relay.poll() is None)
        wait_listening(port, 30, relay, "relay port")
        customer = _relay_cmd(reg, tree, state, "customers", "create", "bench").split()[-1]
        jwt = _relay_cmd(reg, tree, state, "resources", "registration-jwt", "--customer-id", customer).split()[-1]
        agent = reg.spawn([python(), "-m", "agent"], "agent", cwd=tree.path, env=tree.env({
            "RELAY_URL": f"{scheme or tree.carrier}://{LOOPBACK}:{port}", "RELAY_CA_FILE": str(state / "ca.pem"),
            "NAME": name, "APP_HOST": LOOPBACK, "APP_PORT": str(service_port), "REGISTRATION_JWT": jwt,
            **(agent_env or {})}))

        def endpoint() -> int | None:
            rows = json.loads(_relay_cmd(reg, tree, state, "resources", "list", "--output", "json"))
            rows = rows.get("resources", rows) if isinstance(rows, dict) else rows
            for row in rows:
                if row.get("name") == name and row.get("status") == "AVAILABLE":
                    return int(str(row["endpoint"]).rpartition(":")[2])
            return None
        ep = wait_until(endpoint, 45, "resource AVAILABLE", lambda: agent.poll() is None, interval=0.2)
        yield relay, agent, ep
    except HarnessError as exc:
        raise HarnessError(f"{exc}\nrelay: {log_tail(relay)}\nagent: {log_tail(agent) if agent else ''}") from None
    finally:
        if agent is not None:
            reg.stop(agent)
        reg.stop(relay)


def one_run(reg: ProcessRegistry, tree: Tree, echo_port: int, count: int, settle: float,
            profile: Path | None = None, profiler: str = "py-spy") -> dict:
    with tunnel(reg, tree, "echo", echo_port, "rtcpu-") as (relay, agent, ep):
        time.sleep(settle)
        rss = rss_bytes(agent.pid, include_children=False)
        round_trips(ep, 500, warmup=0)  # warm: first stream, caches, allocator
        spies = [] if profile is None else [
            subprocess.Popen(profiler_argv(profiler, profile / f"{tree.name}-{name}", proc.pid),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for name, proc in (("agent", agent), ("relay", relay))]
        a0, r0 = cpu_seconds(agent.pid, False), cpu_seconds(relay.pid, False)
        rt = round_trips(ep, count, warmup=0, max_seconds=120)
        a1, r1 = cpu_seconds(agent.pid, False), cpu_seconds(relay.pid, False)
        for spy in spies:
            spy.send_signal(2)
            spy.wait(30)
        return {"p50": rt.p50_us, "p99": rt.p99_us, "n": rt.count,
                "agent_us": (a1 - a0) / rt.count * 1e6, "relay_us": (r1 - r0) / rt.count * 1e6,
                "rss_mb": rss / 1e6}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trees", default=".", help="comma list of source trees, run interleaved")
    ap.add_argument("--runs", type=int, default=3, help="runs per tree")
    ap.add_argument("--count", type=int, default=20000, help="round trips per run")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds idle before the RSS reading")
    ap.add_argument("--profile", type=Path, help="record profiles of agent "
                    "and relay during the round trips into this directory (the sampling costs CPU: "
                    "the CPU figures of such a run are not comparable)")
    ap.add_argument("--profiler", choices=("py-spy", "perf"), default="py-spy",
                    help="py-spy (Python and native frames) or perf record -g (native, kernel)")
    args = ap.parse_args(argv)
    trees = [Tree(t) for t in args.trees.split(",")]
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    reg = ProcessRegistry(Path(tempfile.mkdtemp(prefix="rtcpu-logs-")))
    results: dict[Tree, list[dict]] = {t: [] for t in trees}
    try:
        echo_port, _ = start_echo(reg)
        for i in range(args.runs):
            for tree in trees:
                load = open("/proc/loadavg").read().split()[0]
                r = one_run(reg, tree, echo_port, args.count, args.settle, args.profile, args.profiler)
                results[tree].append(r)
                print(f"run {i + 1} {tree.name:12s} load {load:>5s}  p50 {r['p50']:6.1f} µs  p99 {r['p99']:6.1f} µs  "
                      f"agent {r['agent_us']:6.1f} µs/rt  relay {r['relay_us']:6.1f} µs/rt  "
                      f"agent idle RSS {r['rss_mb']:5.1f} MB", flush=True)
        print("medians:")
        for tree, rs in results.items():
            med = {k: statistics.median(r[k] for r in rs) for k in ("p50", "p99", "agent_us", "relay_us", "rss_mb")}
            print(f"  {tree.label:40s} p50 {med['p50']:6.1f}  p99 {med['p99']:6.1f}  agent {med['agent_us']:6.1f}  "
                  f"relay {med['relay_us']:6.1f} µs/rt  RSS {med['rss_mb']:5.1f} MB")
    finally:
        reg.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
