"""QUIC links under load: large Redis transfers through a real relay and agent while CPU hogs
hold both cores, counting links lost while data flows (issue 23 item 4).

    python bench/quic_under_load.py                                   # this tree, 1 run of 150 s
    python bench/quic_under_load.py --trees /tmp/base,. --runs 2   # A, B, A, B, ...
    python bench/quic_under_load.py --seconds 15 --hogs 0 --json out.json   # the short form

Each run starts, from the tree under test (``python -m relay`` / ``python -m agent`` with
``PYTHONPATH`` and the working directory set to it), a relay on loopback and an agent linked
over ``--scheme`` (``quic`` by default; ``auto`` and ``wss`` for comparison) serving a private
``redis-server``. Redis holds ``--keys`` values of ``--value-mb`` MB (6.7 MB: the GET that lost
its link in the trial behind the issue), written straight into it. Then, for ``--seconds``:

- ``--hogs`` busy processes (a Python loop each, ended by its own deadline) compete for the two
  cores, and with ``--agent-cores F`` the agent is held to F of a core by a cgroup v1 quota
  (bench/peers/cpucap.py);
- ``--clients`` threads (``--slow-readers`` of them pausing ``--stall`` s inside each GET
  reply, longer than QUIC's idle timeout under ``--agent-keepalive 4``) each connect through
  the relay's endpoint, make 1-4 requests on the connection (mostly GETs of the preloaded
  values, one in four a SET of a fresh value of the same size into the client's own key, read
  back by a later GET) and close it. Every reply is
  checked: its length and sha256 against what Redis was given.

Counted per run: transfers completed and the bytes verified; failures by kind (``reset``:
the connection was reset or broken; ``truncated``: it ended inside a reply; ``corrupt``: the
bytes differ; ``timeout``: no byte for ``--op-timeout`` s; ``refused``; ``error``: a Redis error
reply); and from the logs of both processes, links lost: the agent's ``link lost`` lines and
extra ``connected to`` lines (reconnects), the relay's ``disconnected`` lines, lines naming
``Idle timeout``, tracebacks (``--freeze-agent S`` stops the agent S seconds mid-run: a lost
link these counts must show). The load average is read before and after. A run passes when no
link was lost and no transfer failed; the exit status is 1 when any run did not.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import re
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.peers.cpucap import CpuCap  # noqa: E402
from bench.peers.cpucap import unavailable_reason as cpucap_unavailable  # noqa: E402
from bench.peers.procs import LOOPBACK, ProcessRegistry, cpu_seconds, python  # noqa: E402
from bench.peers.services import start_redis  # noqa: E402
from bench.roundtrip_cpu import Tree, tunnel  # noqa: E402

FAILURE_KINDS = ("reset", "truncated", "corrupt", "timeout", "refused", "error")
#: What the processes' logs say when a link ends (the agent, the relay) or why.
LOG_PATTERNS = {
    "agent_links_lost": re.compile(r"link lost"),
    "agent_connects": re.compile(r"connected to \S+ over"),
    "relay_disconnects": re.compile(r"agent \S+ disconnected \("),
    "idle_timeout_lines": re.compile(r"Idle timeout|idle timeout", re.I),
    "tracebacks": re.compile(r"^Traceback", re.M),
}


class Truncated(Exception):
    """The connection ended inside a reply."""


class RedisError(Exception):
    """Redis answered with an error."""


class Resp:
    """Just enough of the Redis protocol for GET and SET of large values on one connection."""

    def __init__(self, port: int, timeout: float) -> None:
        self.sock = socket.create_connection((LOOPBACK, port), timeout=timeout)
        self.buf = bytearray()

    def close(self) -> None:
        self.sock.close()

    def _fill(self, need: int) -> None:
        while len(self.buf) < need:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise Truncated(f"EOF after {len(self.buf)} of {need} bytes")
            self.buf += chunk

    def _line(self) -> bytes:
        while (end := self.buf.find(b"\r\n")) < 0:
            self._fill(len(self.buf) + 1)
        line = bytes(self.buf[:end])
        del self.buf[:end + 2]
        return line

    def _command(self, *args: bytes) -> None:
        parts = [b"*%d\r\n" % len(args)]
        for a in args:
            parts += [b"$%d\r\n" % len(a), a, b"\r\n"]
        self.sock.sendall(b"".join(parts))

    def set(self, key: bytes, value: bytes) -> None:
        self._command(b"SET", key, value)
        line = self._line()
        if line != b"+OK":
            raise RedisError(line[:200].decode(errors="replace"))

    def get(self, key: bytes, stall: float = 0.0) -> bytes | None:
        """GET ``key``; with ``stall``, stop reading for that long once a first MB arrived (a
        worker busy elsewhere: the reply backs up into the tunnel's windows)."""
        self._command(b"GET", key)
        line = self._line()
        if not line.startswith(b"$"):
            raise RedisError(line[:200].decode(errors="replace"))
        n = int(line[1:])
        if n < 0:
            return None
        if stall:
            self._fill(min(n, 1 << 20))
            time.sleep(stall)
        self._fill(n + 2)
        value = bytes(self.buf[:n])
        del self.buf[:n + 2]
        return value


class Tally:
    """What the clients did, shared by their threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.transfers = Counter()  # "get" / "set" -> completed and verified
        self.failures = Counter()
        self.bytes_verified = 0
        self.examples: list[str] = []
        self.op_seconds: list[float] = []

    def ok(self, op: str, nbytes: int, seconds: float) -> None:
        with self.lock:
            self.transfers[op] += 1
            self.bytes_verified += nbytes
            self.op_seconds.append(seconds)

    def fail(self, kind: str, what: str) -> None:
        with self.lock:
            self.failures[kind] += 1
            if len(self.examples) < 20:
                self.examples.append(f"{time.strftime('%H:%M:%S')} {kind}: {what}")


def make_values(keys: int, size: int, seed: int) -> dict[bytes, bytes]:
    rng = random.Random(seed)
    return {f"load:{i}".encode(): rng.randbytes(size) for i in range(keys)}


def client(n: int, port: int, preloaded: dict[bytes, str], base: bytes, deadline: float, op_timeout: float,
           tally: Tally, seed: int, stall: float = 0.0) -> None:
    """One client: connections of 1-4 requests until ``deadline``; every reply checked. With
    ``stall``, every GET stops reading for that long after its first MB."""
    rng = random.Random(seed * 1000 + n)
    own_key = f"client:{n}".encode()
    expected = dict(preloaded)
    keys = list(preloaded)
    while time.monotonic() < deadline:
        try:
            conn = Resp(port, op_timeout)
        except ConnectionRefusedError as e:
            tally.fail("refused", str(e))
            continue
        except OSError as e:
            tally.fail("timeout" if isinstance(e, socket.timeout) else "reset", f"connect: {e}")
            continue
        try:
            for _ in range(rng.randint(1, 4)):
                if time.monotonic() >= deadline:
                    break
                t0 = time.monotonic()
                if rng.random() < 0.25:
                    cut = rng.randrange(len(base))
                    value = base[cut:] + base[:cut]  # a fresh value of the same size, cheaply
                    op = "set"
                    conn.set(own_key, value)
                    expected[own_key] = hashlib.sha256(value).hexdigest()
                    if own_key not in keys:
                        keys.append(own_key)
                else:
                    key = rng.choice(keys)
                    op = "get"
                    value = conn.get(key, stall)
                    if value is None or hashlib.sha256(value).hexdigest() != expected[key]:
                        tally.fail("corrupt", f"GET {key.decode()}: {'nil' if value is None else len(value)} bytes "
                                   "differ from what was set")
                        break
                tally.ok(op, len(value), time.monotonic() - t0)
        except Truncated as e:
            tally.fail("truncated", str(e))
        except socket.timeout as e:
            tally.fail("timeout", f"no byte for {op_timeout:g} s ({e})")
        except RedisError as e:
            tally.fail("error", str(e))
        except OSError as e:
            tally.fail("reset", f"{type(e).__name__}: {e}")
        finally:
            conn.close()


def freeze(pid: int, at: float, seconds: float) -> None:
    """Stop ``pid`` at monotonic time ``at`` for ``seconds`` (SIGSTOP, SIGCONT): an agent that
    cannot run, whose link must show in the counts as lost (the check that they can)."""
    time.sleep(max(0.0, at - time.monotonic()))
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        os.kill(pid, signal.SIGCONT)


HOG = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"


def count_log(path: Path) -> dict:
    text = Path(path).read_text(errors="replace") if Path(path).exists() else ""
    return {key: len(pattern.findall(text)) for key, pattern in LOG_PATTERNS.items()}


def one_run(reg: ProcessRegistry, tree: Tree, redis_port: int, values: dict[bytes, bytes], args) -> dict:
    preloaded = {k: hashlib.sha256(v).hexdigest() for k, v in values.items()}
    base = next(iter(values.values()))
    agent_env = {"LOG_LEVEL": "INFO"}
    if args.agent_keepalive:
        # The liveness bound auto:// gives its QUIC links (Limits.auto_quic_keepalive_timeout):
        # QUIC's idle timeout is the smaller of both sides', so the relay's link has it too.
        agent_env.update(TUNNEL_KEEPALIVE_TIMEOUT=str(args.agent_keepalive),
                         TUNNEL_KEEPALIVE_INTERVAL=str(min(5.0, args.agent_keepalive / 4)))
    with tunnel(reg, tree, "redis", redis_port, "quicload-", scheme=args.scheme, agent_env=agent_env) as (
            relay, agent, ep), contextlib.ExitStack() as stack:
        if args.agent_cores:
            cap = stack.enter_context(CpuCap(args.agent_cores))
            cap.add(agent.pid)
        load_before = os.getloadavg()
        hogs = [reg.spawn([python(), "-c", HOG.format(seconds=args.seconds + 5)], "hog") for _ in range(args.hogs)]
        a0, r0 = cpu_seconds(agent.pid, False), cpu_seconds(relay.pid, False)
        tally = Tally()
        t0 = time.monotonic()
        deadline = t0 + args.seconds
        threads = [threading.Thread(target=client, args=(n, ep, preloaded, base, deadline, args.op_timeout, tally,
                                                         args.seed, args.stall if n < args.slow_readers else 0.0),
                                    daemon=True) for n in range(args.clients)]
        for t in threads:
            t.start()
        if args.freeze_agent:
            freeze(agent.pid, t0 + args.seconds / 3, args.freeze_agent)
        for t in threads:
            t.join(args.seconds + 2 * args.op_timeout + 30)
        elapsed = time.monotonic() - t0
        stuck = sum(t.is_alive() for t in threads)
        a1, r1 = cpu_seconds(agent.pid, False), cpu_seconds(relay.pid, False)
        load_after = os.getloadavg()
        for h in hogs:
            reg.stop(h)
        agent_alive, relay_alive = agent.poll() is None, relay.poll() is None
        # Read while both still run: stopping them ends the link on purpose.
        agent_counts, relay_counts = count_log(agent.log_path), count_log(relay.log_path)
        agent_log, relay_log = agent.log_path, relay.log_path
    links_lost = (agent_counts["agent_links_lost"] + max(0, agent_counts["agent_connects"] - 1)
                  + relay_counts["relay_disconnects"])
    return {
        "tree": tree.label, "scheme": args.scheme, "seconds": round(elapsed, 1), "clients": args.clients,
        "hogs": args.hogs, "slow_readers": args.slow_readers, "stall": args.stall, "agent_cores": args.agent_cores,
        "agent_keepalive": args.agent_keepalive, "freeze_agent": args.freeze_agent,
        "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in load_after],
        "transfers": dict(tally.transfers), "bytes_verified": tally.bytes_verified,
        "failures": {k: tally.failures[k] for k in FAILURE_KINDS}, "failure_examples": tally.examples,
        "clients_stuck": stuck,
        "transfer_seconds_p50": round(statistics.median(tally.op_seconds), 3) if tally.op_seconds else None,
        "transfer_seconds_max": round(max(tally.op_seconds), 3) if tally.op_seconds else None,
        "agent": agent_counts, "relay": relay_counts, "links_lost": links_lost,
        "idle_timeouts": agent_counts["idle_timeout_lines"] + relay_counts["idle_timeout_lines"],
        "agent_cpu_s": round(a1 - a0, 2), "relay_cpu_s": round(r1 - r0, 2),
        "processes_alive": agent_alive and relay_alive,
        "logs": {"agent": str(agent_log), "relay": str(relay_log)},
    }


def passed(r: dict) -> bool:
    return (r["links_lost"] == 0 and r["idle_timeouts"] == 0 and not any(r["failures"].values())
            and not r["clients_stuck"] and r["processes_alive"] and sum(r["transfers"].values()) > 0
            and r["agent"]["tracebacks"] + r["relay"]["tracebacks"] == 0)


def summary_line(i: int, r: dict, name: str) -> str:
    failures = ", ".join(f"{k} {v}" for k, v in r["failures"].items() if v) or "none"
    return (f"run {i} {name:14s} {r['scheme']:4s} load {r['load_before'][0]:5.2f}->{r['load_after'][0]:5.2f}  "
            f"GET {r['transfers'].get('get', 0):4d}  SET {r['transfers'].get('set', 0):4d}  "
            f"verified {r['bytes_verified'] / 1e6:8.1f} MB  failures: {failures}  links lost {r['links_lost']}  "
            f"idle timeouts {r['idle_timeouts']}  p50/max {r['transfer_seconds_p50']}/{r['transfer_seconds_max']} s  "
            f"CPU agent {r['agent_cpu_s']} s relay {r['relay_cpu_s']} s ({cpu_per_mb(r)})  "
            f"{'PASS' if passed(r) else 'FAIL'}")


def cpu_per_mb(r: dict) -> str:
    mb = r["bytes_verified"] / 1e6
    if not mb:
        return "-"
    return f"{r['agent_cpu_s'] / mb * 1e3:.1f}/{r['relay_cpu_s'] / mb * 1e3:.1f} ms per MB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trees", default=".", help="comma list of source trees, run interleaved")
    ap.add_argument("--runs", type=int, default=1, help="runs per tree")
    ap.add_argument("--seconds", type=float, default=150.0, help="length of each run's load")
    ap.add_argument("--scheme", choices=("quic", "auto", "wss"), default="quic", help="the agent's RELAY_URL scheme")
    ap.add_argument("--clients", type=int, default=6, help="client threads")
    ap.add_argument("--slow-readers", type=int, default=0,
                    help="how many of the clients stop reading each GET for --stall seconds after its first MB")
    ap.add_argument("--stall", type=float, default=6.0, help="a slow reader's pause (s)")
    ap.add_argument("--keys", type=int, default=4, help="values preloaded into Redis")
    ap.add_argument("--value-mb", type=float, default=6.7, help="size of each value (MB)")
    ap.add_argument("--hogs", type=int, default=3, help="busy processes competing for the cores during the run")
    ap.add_argument("--agent-cores", type=float, default=0.0,
                    help="hold the agent to this fraction of a core (cgroup v1 quota; 0: no quota)")
    ap.add_argument("--agent-keepalive", type=float, default=0.0,
                    help="the agent's keepalive timeout (s), which bounds QUIC's idle timeout on both sides; 4: what "
                         "auto:// gives its QUIC links (0: the default, 15)")
    ap.add_argument("--freeze-agent", type=float, default=0.0,
                    help="stop the agent (SIGSTOP) this long, a third into the run: the counts must show its link "
                         "lost (a check of the harness)")
    ap.add_argument("--op-timeout", type=float, default=60.0, help="a request with no byte for this long fails")
    ap.add_argument("--seed", type=int, default=23)
    ap.add_argument("--json", type=Path, help="write every run's counts here")
    ap.add_argument("--logs", type=Path, help="keep the processes' logs in this directory")
    args = ap.parse_args(argv)
    if args.agent_cores and (reason := cpucap_unavailable()):
        ap.error(f"--agent-cores: {reason}")
    trees = [Tree(t) for t in args.trees.split(",")]
    log_dir = args.logs or Path(tempfile.mkdtemp(prefix="quicload-logs-"))
    reg = ProcessRegistry(log_dir)
    runs: list[dict] = []
    try:
        values = make_values(args.keys, int(args.value_mb * 1e6), args.seed)
        redis_port, _ = start_redis(reg, Path(tempfile.mkdtemp(prefix="quicload-redis-")))
        setup = Resp(redis_port, 30)
        for key, value in values.items():
            setup.set(key, value)
        setup.close()
        for i in range(1, args.runs + 1):
            for tree in trees:
                r = one_run(reg, tree, redis_port, values, args)
                r["run"] = i
                runs.append(r)
                print(summary_line(i, r, tree.name), flush=True)
                for example in r["failure_examples"]:
                    print(f"    {example}", flush=True)
    finally:
        reg.close()
    print(f"logs in {log_dir}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"argv": sys.argv[1:], "cpus": os.cpu_count(), "runs": runs}, indent=1))
    return 0 if runs and all(passed(r) for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
