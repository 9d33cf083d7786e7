"""Random faults against a steady real workload on a real cluster, and what must hold.

The cluster is the one deploy/cluster describes, on this machine: PostgreSQL, three relays
(127.0.0.1, .2, .3; tests.helpers.cluster) and HAProxy in front of them on 127.0.0.4
(deploy/cluster/haproxy.cfg). Two agents serve resource ``db`` together (an echo service and,
as resource ``pg``, a second PostgreSQL); a third agent serves ``other``. Agents and workers
know HAProxy's address only.

Workload, for the whole run (each attempt recorded with its start, end and outcome):

- echo streams of random sizes (1 byte to ``--max-stream`` bytes, log-uniform), sent while the
  echo is read, then half-closed; the echo must come back exactly, then the service's end;
- long-lived streams (tens of seconds, a small message every 0.2 s, each echo checked);
- pgbench TPC-B (``-C``: a new connection for every transaction) through resource ``pg``, in
  runs of a few seconds.

The fault injector draws from its own ``random.Random(seed)``: every ``--gap`` seconds (a
random time between its bounds) one of :data:`FAULTS`. Each fault is logged (a JSON line in
``faults.jsonl``: kind, target, start, end) and replayed exactly by the same seed.

Checks (``report.json``; :func:`run` returns it, ``violations`` empty when all hold):

- **exact**: every stream that ended cleanly carried exactly the bytes sent; a stream whose
  bytes differ from what was sent (not merely cut short) is a violation wherever it falls;
- **no hang**: no stream waits longer than :data:`STALL_BOUND` for its next byte (the agent's
  keepalive timeout, 15 s, plus the endpoint hold, 5 s, plus a relay restart, with room);
- **attributed failures**: a failed attempt (refused, reset, cut short; a pgbench run with
  errors) must overlap a fault's window: from its start to :data:`GRACE` seconds after it
  cleared (the relay or agent back, PostgreSQL up, the blackhole lifted);
- **resources**: relays and agents that ran the whole run without a restart end within 10 %
  of the RSS and 16 descriptors they had after the warm-up;
- **logs**: no traceback in any relay or agent log.

    python -m tests.chaos --seconds 1800 --seed 7 --out bench/results/chaos/run-7

**Rolling upgrade** (``Settings.upgrade_from``, ``--rolling-upgrade``): the cluster starts on
the previous release (tests.helpers.release) and, under the same workload, the fault plan is
the upgrade instead of random draws: each relay in turn is stopped with SIGTERM (it drains)
and started again on this tree, then each agent the same way; the rest of the run is steady.
The checks are the same, and stricter on failures: an upgrade step may cost only long streams
still open at a drain timeout (the relay's ``--drain-timeout``, the agent's ``DRAIN_TIMEOUT``);
any other failure attributed to it is a violation (a drained relay or agent loses none).

    python -m tests.chaos --rolling-upgrade --seconds 600 --out bench/results/chaos/upgrade
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tests.helpers import wait_until
from tests.helpers.cluster import HOSTS, Cluster
from tests.helpers.postgres import USER, PostgresServer
from tests.helpers.processes import PY, PrivateService, Proc, _env
from tests.helpers.release import old_prefix

LB = "127.0.0.4"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
ROOT = Path(__file__).resolve().parents[2]
HAPROXY_CONFIG = ROOT / "deploy" / "cluster" / "haproxy.cfg"

#: Longest wait for the next byte of a stream, in seconds (see the module docstring).
STALL_BOUND = 45.0
#: Seconds after a fault cleared during which failures are still its own.
GRACE = 20.0
#: The faults the injector draws from.
FAULTS = ("relay_kill", "relay_term", "agent_kill", "agent_term", "postgres_stop", "blackhole_agent",
          "blackhole_peer", "agent_reload", "rotate_other")
#: The steps of a rolling upgrade (relays, then agents), and the drain timeout of both.
UPGRADES = ("relay_upgrade", "agent_upgrade")
DRAIN_TIMEOUT = 10.0
RSS_BOUND = 0.10
FD_BOUND = 16


@dataclass
class Attempt:
    kind: str
    started: float
    ended: float = 0.0
    outcome: str = "ok"  # ok, or failed: ..., or corrupt: ..., or hung: ...
    size: int = 0


@dataclass
class Fault:
    kind: str
    target: str
    start: float
    end: float = 0.0
    note: str = ""


@dataclass
class Settings:
    seconds: float = 180.0
    seed: int = 1
    warmup: float = 15.0
    gap: tuple[float, float] = (6.0, 14.0)
    #: Faults injected at least, past ``seconds`` if need be: a short run on a slow machine
    #: still meets the faults its seed draws first.
    min_faults: int = 0
    max_stream: int = 8 << 20
    echo_workers: int = 3
    long_workers: int = 2
    #: How long a long-lived stream stays open, seconds (drawn between these bounds).
    long_seconds: tuple[float, float] = (10.0, 40.0)
    pgbench: bool = True
    faults: tuple[str, ...] = FAULTS
    #: The previous release's tree: start on it, and the fault plan is the rolling upgrade.
    upgrade_from: Path | None = None
    #: Wait after the run for the survivors' RSS to come back within the bound too (False:
    #: only their descriptors; RSS is still reported).
    settle_rss: bool = True


class Report:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.attempts: list[Attempt] = []
        self.faults: list[Fault] = []

    def add(self, attempt: Attempt) -> None:
        with self.lock:
            self.attempts.append(attempt)


# ---------------------------------------------------------------------------------- workload


def _recv_until_eof(s: socket.socket, digest, stall: float) -> int:
    s.settimeout(stall)
    n = 0
    while data := s.recv(1 << 18):
        digest.update(data)
        n += len(data)
    return n


def echo_stream(addr, size: int, rng: random.Random) -> Attempt:
    """One stream: ``size`` random bytes sent while the echo is read, half-close, the exact echo
    and the end."""
    attempt = Attempt("echo", time.monotonic(), size=size)
    payload = rng.randbytes(size)
    sent_error: list[BaseException] = []
    try:
        s = socket.create_connection(addr, timeout=STALL_BOUND)
    except OSError as exc:
        attempt.outcome, attempt.ended = f"failed: connect {type(exc).__name__}", time.monotonic()
        return attempt
    with s:
        def send() -> None:
            try:
                view = memoryview(payload)
                for i in range(0, size, 1 << 18):
                    s.sendall(view[i:i + (1 << 18)])
                s.shutdown(socket.SHUT_WR)
            except OSError as exc:
                sent_error.append(exc)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        digest = hashlib.sha256()
        try:
            got = _recv_until_eof(s, digest, STALL_BOUND)
        except socket.timeout:
            attempt.outcome = f"hung: no byte for {STALL_BOUND:g} s"
        except OSError as exc:
            attempt.outcome = f"failed: {type(exc).__name__}"
        else:
            if got == size and digest.digest() == hashlib.sha256(payload).digest():
                attempt.outcome = "ok"
            elif got <= size and digest.digest() == hashlib.sha256(payload[:got]).digest():
                attempt.outcome = f"failed: cut short at {got} of {size} bytes"
            else:
                attempt.outcome = f"corrupt: {got} bytes back of {size}, not what was sent"
        sender.join(STALL_BOUND)
        if attempt.outcome == "ok" and sent_error:
            attempt.outcome = f"failed: send {type(sent_error[0]).__name__}"
    attempt.ended = time.monotonic()
    return attempt


def long_stream(addr, seconds: float, rng: random.Random, stop: threading.Event | None = None) -> Attempt:
    """A stream held open ``seconds`` (or until ``stop`` is set): a small message every 0.2 s,
    each echo checked."""
    attempt = Attempt("long", time.monotonic())
    try:
        with socket.create_connection(addr, timeout=STALL_BOUND) as s:
            s.settimeout(STALL_BOUND)
            end = time.monotonic() + seconds
            while time.monotonic() < end and not (stop is not None and stop.is_set()):
                message = rng.randbytes(rng.randint(1, 2048))
                s.sendall(message)
                got = b""
                while len(got) < len(message):
                    data = s.recv(len(message) - len(got))
                    if not data:
                        raise ConnectionError(f"closed after {attempt.size} bytes")
                    got += data
                if got != message:
                    attempt.outcome = "corrupt: an echo differs from its message"
                    break
                attempt.size += len(message)
                time.sleep(0.2)
            else:
                s.shutdown(socket.SHUT_WR)
                if s.recv(1):
                    attempt.outcome = "corrupt: bytes after the last echo"
    except socket.timeout:
        attempt.outcome = f"hung: no byte for {STALL_BOUND:g} s"
    except OSError as exc:
        attempt.outcome = f"failed: {type(exc).__name__}: {exc}"[:200]
    attempt.ended = time.monotonic()
    return attempt


# ---------------------------------------------------------------------------------- faults


class Blackhole:
    """iptables rules in a chain of this run's own, on loopback only, removed at the end."""

    def __init__(self) -> None:
        self.chain = f"TUNNELCHAOS{os.getpid()}"[:28]
        self.installed = False

    def _ipt(self, *args: str, check: bool = True) -> None:
        subprocess.run(["iptables", "-w", *args], check=check, capture_output=True, timeout=30)

    def install(self) -> None:
        self._ipt("-N", self.chain)
        self._ipt("-I", "OUTPUT", "-o", "lo", "-j", self.chain)
        self.installed = True

    def drop(self, *rules: list[str]) -> None:
        for rule in rules:
            self._ipt("-A", self.chain, "-p", "tcp", *rule, "-j", "DROP")

    def lift(self) -> None:
        self._ipt("-F", self.chain)

    def remove(self) -> None:
        if self.installed:
            self._ipt("-D", "OUTPUT", "-o", "lo", "-j", self.chain, check=False)
            self._ipt("-F", self.chain, check=False)
            self._ipt("-X", self.chain, check=False)
            self.installed = False


def iptables_available() -> str | None:
    """None when this process may add iptables rules, else why not."""
    if os.geteuid() != 0:
        return "not root"
    if not shutil.which("iptables"):
        return "iptables is not installed"
    out = subprocess.run(["iptables", "-w", "-S", "OUTPUT"], capture_output=True, text=True)
    return None if out.returncode == 0 else f"iptables unusable: {out.stderr.strip()[:200]}"


def free_port_range(size: int = 20) -> int:
    """The first of ``size`` consecutive ports free on the relays' hosts and HAProxy's, below
    the kernel's ephemeral ports (a client's port must never take an endpoint's)."""
    rng = random.Random()
    for _ in range(100):
        low = rng.randrange(30000, 32768 - size)
        try:
            for port in range(low, low + size):
                for host in (*HOSTS, LB):
                    with socket.socket() as s:
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                        s.bind((host, port))
        except OSError:
            continue
        return low
    raise RuntimeError("no free port range")


def _listens(addr) -> bool:
    with socket.socket() as s:
        return s.connect_ex(addr) == 0


def local_ports(pid: int, remote_port: int) -> list[int]:
    """Local ports of ``pid``'s established TCP connections to ``remote_port``."""
    out = subprocess.run(["ss", "-tnpH", "state", "established", f"( dport = :{remote_port} )"],
                         capture_output=True, text=True, timeout=30).stdout
    ports = []
    for line in out.splitlines():
        if f"pid={pid}," in line:
            local = line.split()[2]
            ports.append(int(local.rsplit(":", 1)[1]))
    return ports


# ---------------------------------------------------------------------------------- the run


class Chaos:
    def __init__(self, settings: Settings, work: Path) -> None:
        self.s = settings
        self.work = work
        self.report = Report()
        self.rng = random.Random(settings.seed)  # faults: the same seed replays them
        self.stop = threading.Event()
        self.procs_restarted: set[str] = set()
        self.logs: list[Path] = []
        self.blackhole = Blackhole()
        self.pg = None
        self.private_pg = None
        self.cluster: Cluster | None = None
        self.lb: Proc | None = None
        self.agents: dict[str, Proc] = {}
        self.agent_configs: dict[str, tuple[Path, dict]] = {}
        #: Prepended to the agents' commands: the previous release's until upgraded.
        self.agent_prefix: dict[str, list[str]] = {}
        self.old_prefix = old_prefix(settings.upgrade_from) if settings.upgrade_from else []
        self.services: list[PrivateService] = []
        self.fault_log = open(work / "faults.jsonl", "a", buffering=1)

    # ---- set-up

    def start(self) -> None:
        self.pg = PostgresServer().start()
        url = self.pg.url(self.pg.create_database())
        low = free_port_range()
        self.cluster = Cluster(self.work, url, command_prefix=self.old_prefix)
        self.cluster.start("--port-range", f"{low}-{low + 19}", "--server-name", LB, "--drain-timeout",
                           f"{DRAIN_TIMEOUT:g}")
        r1 = self.cluster.relays[0]
        env = _env(LB_BIND=LB, AGENT_PORT=r1.port, ENDPOINT_PORTS=f"{low}-{low + 19}", RELAY1=HOSTS[0],
                   RELAY2=HOSTS[1], RELAY3=HOSTS[2], CHECK_INTERVAL="200ms")
        self.lb = Proc("haproxy", [HAPROXY, "-db", "-f", str(HAPROXY_CONFIG)], env, self.work / "haproxy.log").start()
        wait_until(lambda: _listens((LB, r1.port)), 20, "haproxy to listen")
        self.customer = r1.create_customer("chaos")
        self.token_file = self.work / "customer.jwt"
        self.token_file.write_text(r1.jwt("--customer-id", self.customer))
        echo = PrivateService("echo")
        self.services.append(echo)
        resources = {"db": echo.port}
        if self.s.pgbench:
            self.private_pg = PostgresServer().start()
            self.pg_db = self.private_pg.create_database("bench")
            subprocess.run(["pgbench", "-i", "-q", "-s", "1", "-h", "127.0.0.1", "-p", str(self.private_pg.port),
                            "-U", USER, self.pg_db], check=True, capture_output=True, timeout=120,
                           env={**os.environ, "PGPASSWORD": self.private_pg.password})
            resources["pg"] = self.private_pg.port
        for name in ("a1", "a2", "other"):
            self.agent_prefix[name] = self.old_prefix
        for name in ("a1", "a2"):
            self._write_config(name, resources, self.token_file)
            self._start_agent(name)
        other = PrivateService("echo")
        self.services.append(other)
        self._write_config("other", {"other": other.port}, self.token_file)
        self._start_agent("other")
        for name in resources:
            r1.wait_available(self.customer, name, agents=2, timeout=60)
        r1.wait_available(self.customer, "other", timeout=60)
        by_name = {r["name"]: r for r in r1.resources()}
        self.other_id = by_name["other"]["id"]
        self.endpoints = {n: (LB, int(by_name[n]["endpoint"].rsplit(":", 1)[1])) for n in resources}
        if "blackhole_agent" in self.s.faults or "blackhole_peer" in self.s.faults:
            self.blackhole.install()

    def _write_config(self, name: str, resources: dict, token_file: Path) -> None:
        path = self.work / f"{name}.toml"
        lines = [f'relay_url = "wss://{LB}:{self.cluster.relays[0].port}"',
                 f'ca_file = "{self.cluster.ca_file}"', f'registration_jwt_file = "{token_file}"',
                 # the relays the cluster names sit on other loopback addresses than the balancer
                 'relay_allow_hosts = ["127.0.0.0/8"]']
        for resource, port in resources.items():
            lines += ["[[resources]]", f'name = "{resource}"', 'host = "127.0.0.1"', f"port = {port}"]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, path)
        self.agent_configs[name] = (path, dict(resources))

    def _start_agent(self, name: str) -> None:
        path, _ = self.agent_configs[name]
        n = sum(1 for p in self.work.glob(f"agent-{name}-*.log")) + 1
        log = self.work / f"agent-{name}-{n}.log"
        self.logs.append(log)
        env = _env(LOG_LEVEL="INFO", DRAIN_TIMEOUT=DRAIN_TIMEOUT if self.s.upgrade_from else None)
        self.agents[name] = Proc(name, [*self.agent_prefix[name], PY, "-m", "agent", "--config", str(path)], env,
                                 log).start()

    # ---- workload threads

    def _echo_worker(self, i: int) -> None:
        rng = random.Random(f"{self.s.seed}-echo-{i}")
        while not self.stop.is_set():
            size = int(math.exp(rng.uniform(0, math.log(self.s.max_stream))))
            self.report.add(echo_stream(self.endpoints["db"], size, rng))

    def _long_worker(self, i: int) -> None:
        rng = random.Random(f"{self.s.seed}-long-{i}")
        while not self.stop.is_set():
            self.report.add(long_stream(self.endpoints["db"], rng.uniform(*self.s.long_seconds), rng, self.stop))

    def _pgbench_worker(self) -> None:
        host, port = self.endpoints["pg"]
        env = {**os.environ, "PGPASSWORD": self.private_pg.password, "PGCONNECT_TIMEOUT": "20"}
        while not self.stop.is_set():
            attempt = Attempt("pgbench", time.monotonic())
            try:
                out = subprocess.run(["pgbench", "-n", "-C", "-c", "2", "-T", "5", "-h", host, "-p", str(port),
                                      "-U", USER, self.pg_db], capture_output=True, text=True,
                                     timeout=5 + STALL_BOUND, env=env)
                if out.returncode != 0:
                    attempt.outcome = "failed: " + (out.stderr.strip().splitlines() or ["pgbench failed"])[-1][:200]
                else:
                    attempt.size = int(next((line.split()[-1] for line in out.stdout.splitlines()
                                             if "number of transactions actually processed" in line), "0")
                                       .split("/")[0] or 0)
            except subprocess.TimeoutExpired:
                attempt.outcome = f"hung: pgbench ran past {5 + STALL_BOUND:g} s"
            attempt.ended = time.monotonic()
            self.report.add(attempt)

    # ---- the injector

    def _record(self, fault: Fault) -> None:
        self.report.faults.append(fault)
        self.fault_log.write(json.dumps(asdict(fault)) + "\n")

    def _restart_relay(self, index: int, sig: int) -> str:
        relay = self.cluster.relays[index]
        relay.proc.signal(sig)
        code = relay.proc.proc.wait(60)
        self.procs_restarted.add(f"relay{index + 1}")
        time.sleep(self.rng.uniform(0.5, 3.0))
        self.cluster.restart(relay)
        return f"exit {code}"

    def _restart_agent(self, name: str, sig: int) -> str:
        agent = self.agents[name]
        agent.signal(sig)
        code = agent.proc.wait(60)
        self.procs_restarted.add(f"agent-{name}")
        time.sleep(self.rng.uniform(0.5, 3.0))
        self._start_agent(name)
        return f"exit {code}"

    def upgrade(self, kind: str, index: int) -> None:
        """One step of the rolling upgrade: relay or agent ``index`` stopped with SIGTERM (it
        drains) and started again on this tree."""
        fault = Fault(kind, "", time.monotonic())
        if kind == "relay_upgrade":
            relay = self.cluster.relays[index]
            fault.target = f"relay{index + 1}"
            relay.proc.signal(signal.SIGTERM)
            code = relay.proc.proc.wait(DRAIN_TIMEOUT + 50)
            relay.command_prefix = []
            self.cluster.restart(relay)
        else:
            name = ("a1", "a2", "other")[index]
            fault.target = f"agent-{name}"
            agent = self.agents[name]
            agent.signal(signal.SIGTERM)
            code = agent.proc.wait(DRAIN_TIMEOUT + 50)
            self.agent_prefix[name] = []
            self._start_agent(name)
            # Serving again before the next step, as an operator's rollout waits for readiness.
            resources = self.agent_configs[name][1]
            relay = next(r for r in self.cluster.relays if r.proc.alive())
            for resource in resources:
                relay.wait_available(self.customer, resource, agents=2 if name != "other" else 1, timeout=60)
        self.procs_restarted.add(fault.target)
        fault.note = f"exit {code}"
        fault.end = time.monotonic()
        self._record(fault)

    def inject(self, kind: str) -> None:
        rng = self.rng
        fault = Fault(kind, "", time.monotonic())
        if kind in ("relay_kill", "relay_term"):
            index = rng.randrange(3)
            fault.target = f"relay{index + 1}"
            fault.note = self._restart_relay(index, signal.SIGKILL if kind == "relay_kill" else signal.SIGTERM)
        elif kind in ("agent_kill", "agent_term"):
            name = rng.choice(("a1", "a2"))
            fault.target = f"agent-{name}"
            fault.note = self._restart_agent(name, signal.SIGKILL if kind == "agent_kill" else signal.SIGTERM)
        elif kind == "postgres_stop":
            fault.target = "postgresql"
            self.pg.stop("immediate")
            time.sleep(rng.uniform(2.0, 6.0))
            self.pg.start()
        elif kind == "blackhole_agent":
            name = rng.choice(("a1", "a2"))
            ports = local_ports(self.agents[name].pid, self.cluster.relays[0].port)
            pick = rng.random()  # drawn whatever the ports, so that the seed's later draws do not shift
            port = ports[int(pick * len(ports))] if ports else None
            hold = rng.uniform(3.0, 10.0)
            fault.target = f"agent-{name} link from port {port}"
            if port is not None:
                self.blackhole.drop(["--sport", str(port)], ["--dport", str(port)])
                time.sleep(hold)
                self.blackhole.lift()
        elif kind == "blackhole_peer":
            a, b = rng.sample(range(3), 2)
            fault.target = f"relay{a + 1} <-> relay{b + 1}"
            ports = [int(r["peer_address"].rsplit(":", 1)[1]) for r in self._relay_rows() if r.get("peer_address")]
            rules = []
            for src, dst in ((HOSTS[a], HOSTS[b]), (HOSTS[b], HOSTS[a])):
                for port in ports:
                    rules += [["-s", src, "-d", dst, "--dport", str(port)],
                              ["-s", src, "-d", dst, "--sport", str(port)]]
            self.blackhole.drop(*rules)
            time.sleep(rng.uniform(3.0, 10.0))
            self.blackhole.lift()
        elif kind == "agent_reload":
            name = rng.choice(("a1", "a2"))
            fault.target = f"agent-{name}"
            path, resources = self.agent_configs[name]
            extra = self.services[1].port
            changed = dict(resources)
            if "extra" in changed:
                del changed["extra"]
            else:
                changed["extra"] = extra
            self._write_config(name, changed, self.token_file)
            self.agents[name].signal(signal.SIGHUP)
            fault.note = "added extra" if "extra" in changed else "removed extra"
        elif kind == "rotate_other":
            fault.target = "agent-other"
            relay = self.cluster.relays[rng.randrange(3)]
            if relay.proc.alive():
                token = relay.jwt("--customer-id", self.customer, "--resource-id", self.other_id, "--rotate")
                jwt = self.work / "other.jwt"
                jwt.write_text(token)
                self._write_config("other", self.agent_configs["other"][1], jwt)
                # The revoked agent stops (its only resource); its operator starts it with the new token.
                wait_until(lambda: not self.agents["other"].alive(), 30, "the revoked agent to stop")
                fault.note = f"exit {self.agents['other'].proc.returncode}"
                self.procs_restarted.add("agent-other")
                self._start_agent("other")
        fault.end = time.monotonic()
        self._record(fault)

    def _relay_rows(self) -> list[dict]:
        from relay.control.admin_client import AdminClient

        for relay in self.cluster.relays:
            if relay.proc.alive():
                try:
                    return AdminClient.discover(relay.state_dir, timeout=10).cluster_status()["relays"]
                except Exception:  # noqa: BLE001 - try the next relay
                    continue
        return []

    # ---- measuring

    def _processes(self) -> dict[str, int]:
        found = {f"relay{i + 1}": r.proc.pid for i, r in enumerate(self.cluster.relays) if r.proc.alive()}
        found.update({f"agent-{n}": p.pid for n, p in self.agents.items() if p.alive()})
        return found

    @staticmethod
    def _usage(pid: int) -> tuple[int, int]:
        rss = 0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
        return rss, len(os.listdir(f"/proc/{pid}/fd"))

    def run(self) -> dict:
        s = self.s
        started = time.monotonic()
        threads = [threading.Thread(target=self._echo_worker, args=(i,), daemon=True) for i in range(s.echo_workers)]
        threads += [threading.Thread(target=self._long_worker, args=(i,), daemon=True) for i in range(s.long_workers)]
        if s.pgbench:
            threads.append(threading.Thread(target=self._pgbench_worker, daemon=True))
        for t in threads:
            t.start()
        self.stop.wait(s.warmup)
        baseline = {name: self._usage(pid) for name, pid in self._processes().items()}
        deadline = started + s.seconds
        if s.upgrade_from is not None:
            plan = [("relay_upgrade", i) for i in range(3)] + [("agent_upgrade", i) for i in range(3)]
            for kind, index in plan:
                self.stop.wait(self.rng.uniform(*s.gap))
                self.upgrade(kind, index)
            self.stop.wait(max(0.0, deadline - time.monotonic()))

        def over() -> bool:
            return time.monotonic() >= deadline and len(self.report.faults) >= s.min_faults

        while s.upgrade_from is None and not over():
            gap = self.rng.uniform(*s.gap)
            time.sleep(gap if len(self.report.faults) < s.min_faults else min(gap, max(0.0, deadline - time.monotonic())))
            if over():
                break
            self.inject(self.rng.choice(s.faults))
        self.stop.set()
        for t in threads:
            t.join(STALL_BOUND + 30)
        # Survivors settle back (streams closed, buffers released): wait for it, within a bound.
        survivors = {n: pid for n, pid in self._processes().items() if n not in self.procs_restarted and n in baseline}

        def settled() -> bool:
            return all(self._within(baseline[n], self._usage(pid), s.settle_rss) for n, pid in survivors.items())

        try:
            wait_until(settled, 30, "survivors' memory and descriptors back near their baseline", interval=1)
        except AssertionError:
            pass  # reported below
        usage = {n: self._usage(pid) for n, pid in survivors.items()}
        return self._report(started, baseline, usage)

    @staticmethod
    def _within(before: tuple[int, int], after: tuple[int, int], rss: bool = True) -> bool:
        return (not rss or after[0] <= before[0] * (1 + RSS_BOUND)) and after[1] <= before[1] + FD_BOUND

    def _report(self, started: float, baseline: dict, usage: dict) -> dict:
        windows = [(f.start, f.end + GRACE, f) for f in self.report.faults]
        violations = []
        counts: dict[str, dict[str, int]] = {}
        attributed: dict[str, int] = {}
        failures: list[dict] = []
        for a in self.report.attempts:
            kind_counts = counts.setdefault(a.kind, {"ok": 0, "failed": 0, "corrupt": 0, "hung": 0})
            kind_counts[a.outcome.split(":")[0]] += 1
            if a.outcome == "ok":
                continue
            if a.outcome.startswith(("corrupt", "hung")):
                violations.append(f"{a.kind} stream ({a.size} bytes) at {a.started - started:.1f} s: {a.outcome}")
                continue
            # The latest fault that began before the attempt ended, among those whose window it meets.
            causes = [f for lo, hi, f in windows if a.started <= hi and a.ended >= lo and f.start <= a.ended]
            if causes and causes[-1].kind in UPGRADES and not (a.kind == "long" and a.started < causes[-1].start):
                violations.append(f"{a.kind} attempt at {a.started - started:.1f}-{a.ended - started:.1f} s failed "
                                  f"during {causes[-1].kind} {causes[-1].target}, which drains: {a.outcome}")
            elif causes:
                key = f"{causes[-1].kind} {causes[-1].target}"
                attributed[key] = attributed.get(key, 0) + 1
                failures.append({"kind": a.kind, "start": round(a.started - started, 1),
                                 "end": round(a.ended - started, 1), "size": a.size, "outcome": a.outcome,
                                 "fault": key})
            else:
                violations.append(f"{a.kind} attempt at {a.started - started:.1f}-{a.ended - started:.1f} s failed "
                                  f"outside every fault window: {a.outcome}")
        resources = {}
        for name, after in usage.items():
            before = baseline[name]
            resources[name] = {"rss_before": before[0], "rss_after": after[0], "fds_before": before[1],
                               "fds_after": after[1]}
            if not self._within(before, after):
                violations.append(f"{name}: RSS {before[0] >> 10} -> {after[0] >> 10} KiB, descriptors "
                                  f"{before[1]} -> {after[1]} (bounds +{RSS_BOUND:.0%}, +{FD_BOUND})")
        logs = [p for p in self.work.glob("*.log")]
        for log in logs:
            text = log.read_text(errors="replace")
            if "Traceback" in text:
                violations.append(f"traceback in {log.name}")
        return {
            "seed": self.s.seed, "seconds": round(time.monotonic() - started, 1), "settings": asdict(self.s),
            "faults": [{**asdict(f), "start": round(f.start - started, 1), "end": round(f.end - started, 1)}
                       for f in self.report.faults],
            "attempts": counts, "bytes_echoed_exactly": sum(a.size for a in self.report.attempts
                                                             if a.outcome == "ok" and a.kind == "echo"),
            "failures_attributed": attributed, "failures": failures, "resources": resources,
            "violations": violations,
        }

    def close(self) -> None:
        self.stop.set()
        self.blackhole.remove()
        for proc in self.agents.values():
            proc.stop()
        if self.lb is not None:
            self.lb.stop()
        if self.cluster is not None:
            self.cluster.stop()
        for service in self.services:
            service.close()
        for pg in (self.pg, self.private_pg):
            if pg is not None:
                pg.destroy()
        self.fault_log.close()


def unavailable_reason() -> str | None:
    """None when this machine can run the harness, else why not."""
    from tests.helpers.cluster import aliases_work
    from tests.helpers.postgres import bin_dir

    if not aliases_work():
        return "127.0.0.2/.3 are not loopback addresses here"
    with socket.socket() as s:
        try:
            s.bind((LB, 0))
        except OSError:
            return f"{LB} is not a loopback address here"
    if not os.access(HAPROXY, os.X_OK):
        return "haproxy is not installed (scripts/setup.sh)"
    if bin_dir() is None or not shutil.which("pgbench"):
        return "PostgreSQL is not installed (scripts/setup.sh)"
    return None


def available_faults() -> tuple[str, ...]:
    """:data:`FAULTS`, without the blackholes where iptables cannot be used."""
    if iptables_available() is None:
        return FAULTS
    return tuple(f for f in FAULTS if not f.startswith("blackhole"))


def run(settings: Settings, out: Path | None = None) -> dict:
    """One chaos run; the report (also ``report.json`` and ``faults.jsonl`` in ``out``)."""
    work = Path(tempfile.mkdtemp(prefix=f"chaos-{settings.seed}-"))
    chaos = Chaos(settings, work)
    try:
        chaos.start()
        report = chaos.run()
    finally:
        chaos.close()
    report["work_dir"] = str(work)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
        shutil.copy(work / "faults.jsonl", out / "faults.jsonl")
    return report
