"""End-to-end helpers: real relay and agent processes started as users start them, and
private services on loopback. Everything waits on conditions with deadlines, never sleeps."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable


def free_port() -> int:
    """A port free on loopback for both TCP and UDP."""
    for _ in range(100):
        with socket.socket() as t:
            t.bind(("127.0.0.1", 0))
            port = t.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port")


def free_port_range(n: int) -> tuple[int, int]:
    """``n`` consecutive ports free on 127.0.0.1 now, below the kernel's ephemeral range (so that
    no outgoing connection of a busy test run takes one meanwhile), probed as the relay binds its
    endpoints (SO_REUSEADDR: a port in TIME_WAIT is free to a listener); (first, last)."""
    rng = random.Random()
    for _ in range(100):
        low = rng.randrange(12000, 19000 - n)
        socks = []
        try:
            for port in range(low, low + n):
                sock = socket.socket()
                socks.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("127.0.0.1", port))
            return low, low + n - 1
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise AssertionError("no free port range")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "TUNNEL_", "REGISTRATION_"))}
    env.update({k: str(v) for k, v in extra.items() if v is not None})
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


class Proc:
    """A child process with its log file; stopped at teardown."""

    def __init__(self, name: str, cmd: list[str], env: dict, log_path: Path, preexec_fn=None) -> None:
        self.name = name
        self.cmd = cmd
        self.env = env
        self.log_path = log_path
        self.preexec_fn = preexec_fn  # e.g. resource limits for the child
        self.proc: subprocess.Popen | None = None

    def start(self) -> Proc:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=ROOT, start_new_session=True,
                                     preexec_fn=self.preexec_fn)
        log.close()
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        return self.proc.returncode

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(10)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


class Relay:
    """``tunnel-relay serve`` on a loopback address (``host``, default 127.0.0.1: agents,
    admin API and resource endpoints) with its own state dir and ports."""

    def __init__(self, workdir: Path, port: int | None = None, host: str = "127.0.0.1",
                 command_prefix: list[str] | None = None, state_dir: Path | None = None) -> None:
        self.state_dir = state_dir or workdir / "relay-state"
        self.workdir = workdir
        #: Where it listens for agents and binds endpoints (another address: a network namespace).
        self.host = host
        #: Prepended to its commands, e.g. ``ip netns exec NAME``.
        self.command_prefix = command_prefix or []
        #: The admin API: on ``host`` (a loopback address), or the namespace's own loopback.
        self.admin_host = "127.0.0.1" if self.command_prefix else host
        self.port = port or free_port()
        self.admin_port = free_port()
        self.proc: Proc | None = None
        self.starts = 0
        #: Run in the relay process before it starts (e.g. a low open-file limit).
        self.preexec_fn = None
        #: Extra command-line options of ``serve``.
        self.serve_args: list[str] = []

    @property
    def url(self) -> str:
        return f"wss://{self.host}:{self.port}"

    @property
    def ca_file(self) -> str:
        return str(self.state_dir / "ca.pem")

    def start(self, *args: str, **env) -> Relay:
        """``tunnel-relay serve`` with ``args`` added to its options and ``env`` to its environment."""
        self.starts += 1
        cmd = [*self.command_prefix, PY, "-m", "relay", "serve", "--state-dir", str(self.state_dir), "--listen",
               f"{self.host}:{self.port}", "--admin-listen", f"{self.admin_host}:{self.admin_port}",
               "--service-host", self.host, *self.serve_args, *args]
        name = "relay" if self.host == "127.0.0.1" else f"relay-{self.host}"
        self.proc = Proc("relay", cmd, _env(**env), self.workdir / f"{name}-{self.starts}.log",
                         self.preexec_fn).start()
        wait_until(self._ready, 30, "the relay to start")
        return self

    def _ready(self) -> bool:
        if not self.proc.alive():
            raise AssertionError(f"relay exited with {self.proc.proc.returncode}:\n{self.proc.log()[-3000:]}")
        if not (self.state_dir / "admin.json").exists():
            return False
        with socket.socket() as s:
            if s.connect_ex((self.host, self.port)):
                return False
        return self.cli("customers", "list", check=False).returncode == 0

    def cli(self, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
        out = subprocess.run([*self.command_prefix, PY, "-m", "relay", "--state-dir", str(self.state_dir), *args],
                             env=_env(**(env or {})),
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
        if check and out.returncode:
            raise AssertionError(f"tunnel-relay {' '.join(args)} failed ({out.returncode}): {out.stderr}")
        return out

    def create_customer(self, name: str = "acme") -> str:
        return self.cli("customers", "create", name).stdout.strip()

    def jwt(self, *args: str) -> str:
        return self.cli("resources", "registration-jwt", *args).stdout.strip()

    def resources(self, extended: bool = False) -> list[dict]:
        args = ["resources", "list", "--output", "json"] + (["--extended"] if extended else [])
        return json.loads(self.cli(*args).stdout)

    def resource(self, customer_id: str, name: str) -> dict | None:
        return next((r for r in self.resources(extended=True)
                     if r["customer_id"] == customer_id and r["name"] == name), None)

    def wait_available(self, customer_id: str, name: str, agents: int = 1, timeout: float = 30) -> dict:
        def check():
            r = self.resource(customer_id, name)
            return r if r and r["status"] == "AVAILABLE" and r["agents"] >= agents else None
        return wait_until(check, timeout, f"resource {name} AVAILABLE with {agents} agent(s)")

    def endpoint(self, customer_id: str, name: str) -> tuple[str, int]:
        host, _, port = self.resource(customer_id, name)["endpoint"].rpartition(":")
        return host.strip("[]"), int(port)

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()


class Agents:
    """Starts ``tunnel-agent`` processes; all stopped at teardown."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[Proc] = []

    def start(self, relay_url: str, token: str, name: str, app_port: int, app_host: str = "127.0.0.1",
              ca_file: str | None = None, preexec_fn=None, **env) -> Proc:
        n = len(self.procs) + 1
        env = {"LOG_LEVEL": "DEBUG", **env}
        proc = Proc(f"agent{n}", [PY, "-m", "agent"], _env(RELAY_URL=relay_url, REGISTRATION_JWT=token, NAME=name,
                                                          APP_HOST=app_host, APP_PORT=app_port, RELAY_CA_FILE=ca_file,
                                                          **env),
                    self.workdir / f"agent{n}.log", preexec_fn).start()
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for p in self.procs:
            p.stop()


@dataclass
class ServiceRecord:
    received: dict = field(default_factory=dict)  # connection number -> sha256 of what arrived


class PrivateService:
    """A threaded TCP service on loopback.

    Modes: ``echo`` echoes as it reads and closes after EOF; ``drain-then-echo`` reads until EOF
    and then sends it all back; ``speak-first`` sends ``greeting`` bytes, half-closes, then reads
    until EOF and records the sha256 of what it read.
    """

    def __init__(self, mode: str = "echo", greeting: bytes = b"", port: int = 0) -> None:
        self.mode = mode
        self.greeting = greeting
        self.record = ServiceRecord()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                n = self.connections
            threading.Thread(target=self._serve, args=(conn, n), daemon=True).start()

    def _serve(self, conn: socket.socket, n: int) -> None:
        with conn:
            try:
                if self.mode == "echo":
                    while data := conn.recv(262144):
                        conn.sendall(data)
                elif self.mode == "drain-then-echo":
                    chunks = []
                    while data := conn.recv(262144):
                        chunks.append(data)
                    conn.sendall(b"".join(chunks))
                elif self.mode == "speak-first":
                    conn.sendall(self.greeting)
                    conn.shutdown(socket.SHUT_WR)
                    digest = hashlib.sha256()
                    while data := conn.recv(262144):
                        digest.update(data)
                    self.record.received[n] = digest.hexdigest()
            except OSError:
                pass

    def close(self) -> None:
        self._closed = True
        self.sock.close()


def connect(addr: tuple[str, int], timeout: float = 20.0) -> socket.socket:
    s = socket.create_connection(addr, timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def echoed(s: socket.socket, data: bytes) -> bool:
    """Send ``data`` on ``s`` (to an echo service) and tell whether exactly it came back."""
    s.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = s.recv(65536)
        if not chunk:
            return False
        got += chunk
    return got == data


def recv_all(s: socket.socket) -> bytes:
    chunks = []
    while data := s.recv(262144):
        chunks.append(data)
    return b"".join(chunks)
