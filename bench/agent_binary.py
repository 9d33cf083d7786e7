"""Single-file agent builds side by side: start time, idle RSS and CPU per byte with the agent
capped at 0.31 of a core, moving bulk data through a real relay.

    python bench/agent_binary.py NAME=COMMAND [NAME=COMMAND ...] [--mib 256] [--quota 0.31]

Each COMMAND starts an agent (``dist/tunnel-agent``, or ``"python -m agent"``). Per build:

- *start*: median wall time of ``COMMAND --version`` over 7 runs, and the time from exec to
  the relay listing the agent (registered, over WSS);
- *idle RSS*: the sum over the agent's process tree (a onefile binary is a bootstrap parent
  plus the real process) after 5 s idle, registered;
- *CPU per byte*: the agent tree's user+system CPU time (from /proc) while ``--mib`` MiB flow
  worker -> relay -> agent -> private service, divided by the bytes, with the tree in a cgroup
  v1 CPU group of ``cpu.cfs_quota_us / cpu.cfs_period_us`` = ``--quota`` (root only);
  ``--mib 0`` measures start and idle RSS only.

``--detail`` also prints, per build, where the idle RSS lies: the threads and the resident
kilobytes of each mapping of the agent's process (``/proc/PID/smaps``: shared libraries by
file, the heap, anonymous mappings such as thread stacks and malloc arenas).

The relay runs from this checkout with the interpreter that runs this script, uncapped.
Prints one Markdown table. Run on an otherwise idle machine; note the load average shown.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CGROUP = Path("/sys/fs/cgroup/cpu")
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except Exception:  # noqa: BLE001 - not up yet
            value = None
        if value:
            return value
        time.sleep(0.02)
    raise RuntimeError(f"timed out waiting for {what}")


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return pids


def rss_kib(pids: list[int]) -> int:
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def mappings(pid: int) -> tuple[int, list[tuple[int, str]]]:
    """The threads of ``pid`` and its resident KiB per mapping name (a file's mappings summed;
    anonymous ones by their kind), largest first."""
    by_name: dict[str, int] = {}
    name = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and not head[0].endswith(":"):
            name = head[5] if len(head) > 5 else "[anonymous]"
            name = os.path.basename(name) if name.startswith("/") else name
        elif head[0] == "Rss:":
            by_name[name] = by_name.get(name, 0) + int(head[1])
    threads = len(list(Path(f"/proc/{pid}/task").iterdir()))
    return threads, sorted(((kib, n) for n, kib in by_name.items()), reverse=True)


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except OSError:
            pass
    return total / TICK


class Sink:
    """The private service: reads everything, counts it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.received = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(1 << 18):
                    self.received += len(data)


class Bench:
    def __init__(self, workdir: Path, quota: float) -> None:
        self.workdir = workdir
        self.quota = quota
        self.port = free_port()
        self.admin = free_port()
        self.state = workdir / "relay-state"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.env = env
        self.relay = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve", "--state-dir", str(self.state), "--listen",
             f"127.0.0.1:{self.port}", "--admin-listen", f"127.0.0.1:{self.admin}"],
            env=env, stdout=open(workdir / "relay.log", "wb"), stderr=subprocess.STDOUT)
        wait_until(lambda: self._cli("customers", "list"), 30, "the relay")
        self.customer = self._cli("customers", "create", "bench").strip()
        self.token = self._cli("resources", "registration-jwt", "--customer-id", self.customer).strip()
        self.sink = Sink()

    def _cli(self, *args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "relay", "--state-dir", str(self.state), *args], env=self.env,
                             capture_output=True, text=True, timeout=30)
        return out.stdout if out.returncode == 0 else ""

    def resource(self, name: str) -> dict | None:
        rows = json.loads(self._cli("resources", "list", "--output", "json") or "[]")
        return next((r for r in rows if r["name"] == name), None)

    def cgroup(self, name: str) -> Path | None:
        if os.geteuid() != 0 or not (CGROUP / "cpu.cfs_quota_us").exists():
            return None
        group = CGROUP / f"tunnel-agent-bench-{os.getpid()}-{name}"
        group.mkdir(exist_ok=True)
        period = int((group / "cpu.cfs_period_us").read_text())
        (group / "cpu.cfs_quota_us").write_text(str(int(period * self.quota)))
        return group

    def measure(self, name: str, command: list[str], mib: int, repeat: int, detail: bool = False) -> dict:
        versions = []
        for _ in range(7):
            t0 = time.perf_counter()
            subprocess.run(command + ["--version"], capture_output=True, timeout=60, check=True)
            versions.append(time.perf_counter() - t0)
        group = self.cgroup(name)
        prefix = ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh"] if group else []
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "TUNNEL_"))}
        env.update(RELAY_URL=f"wss://127.0.0.1:{self.port}", RELAY_CA_FILE=str(self.state / "ca.pem"),
                   NAME=name, APP_HOST="127.0.0.1", APP_PORT=str(self.sink.port), REGISTRATION_JWT=self.token)
        t0 = time.perf_counter()
        agent = subprocess.Popen(prefix + command, env=env, stdout=open(self.workdir / f"{name}.log", "wb"),
                                 stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: (r := self.resource(name)) and r["status"] == "AVAILABLE", 60, f"{name} registered")
            registered = time.perf_counter() - t0
            time.sleep(5)
            pids = tree(agent.pid)
            idle = rss_kib(pids)
            if detail:
                threads, maps = mappings(pids[-1])
                print(f"{name}: {idle / 1024:.1f} MiB idle over {len(pids)} process(es); the agent's "
                      f"{threads} thread(s) and its largest mappings (KiB resident):")
                print("  " + ", ".join(f"{n} {kib}" for kib, n in maps[:14]))
            host, _, port = self.resource(name)["endpoint"].rpartition(":")
            chunk = b"\0" * (1 << 20)
            total = mib << 20
            per_byte, rates = [], []
            for _ in range(repeat if mib else 0):
                before_cpu, before_sink = cpu_seconds(pids), self.sink.received
                t1 = time.perf_counter()
                with socket.create_connection((host, int(port))) as s:
                    for _ in range(mib):
                        s.sendall(chunk)
                    s.shutdown(socket.SHUT_WR)
                    s.recv(1)
                wait_until(lambda: self.sink.received - before_sink >= total, 300, "the bytes to arrive")
                rates.append(mib / (time.perf_counter() - t1))
                per_byte.append((cpu_seconds(pids) - before_cpu) * 1e9 / total)
            peak = rss_kib(pids)
        finally:
            agent.terminate()
            agent.wait(30)
            if group:
                group.rmdir()
        return {"name": name, "version_s": statistics.median(versions), "registered_s": registered,
                "idle_rss_mib": idle / 1024, "busy_rss_mib": peak / 1024, "processes": len(pids),
                "cpu_ns_per_byte": statistics.median(per_byte) if per_byte else float("nan"),
                "mib_per_s": statistics.median(rates) if rates else float("nan"),
                "capped": group is not None}

    def close(self) -> None:
        self.relay.terminate()
        self.relay.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("builds", nargs="+", metavar="NAME=COMMAND")
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--quota", type=float, default=0.31)
    parser.add_argument("--repeat", type=int, default=5, help="bulk runs per build (medians are shown)")
    parser.add_argument("--detail", action="store_true", help="print each idle agent's threads and mappings")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(Path(tmp), args.quota)
        try:
            rows = []
            for spec in args.builds:
                name, _, command = spec.partition("=")
                rows.append(bench.measure(name, shlex.split(command), args.mib, args.repeat, args.detail))
        finally:
            bench.close()
    print(f"load average before/after: {os.getloadavg()[0]:.2f}; agent cap {args.quota} core "
          f"({'cgroup v1 cpu quota' if rows[0]['capped'] else 'NOT capped: needs root and cgroup v1'}); "
          f"{args.mib} MiB worker -> relay -> agent -> service over WSS, median of {args.repeat}\n")
    print("| build | --version (s) | exec to registered (s) | idle RSS (MiB, processes) | busy RSS (MiB) "
          "| CPU ns/byte | MiB/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['version_s']:.3f} | {r['registered_s']:.2f} | {r['idle_rss_mib']:.1f} "
              f"({r['processes']}) | {r['busy_rss_mib']:.1f} | {r['cpu_ns_per_byte']:.2f} | {r['mib_per_s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
