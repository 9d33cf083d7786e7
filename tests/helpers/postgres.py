"""A real PostgreSQL server for the tests and benchmarks: Debian's binaries, a fresh cluster
made by ``initdb`` in a temporary directory, listening on loopback on a free port.

PostgreSQL refuses to run as root; as root the server runs as the ``postgres`` user that
Debian's package creates (or ``tunnel-pg``, created here if neither exists). Clients connect
over TCP with a password (SCRAM), as a relay would; the helper itself uses ``psql`` over the
cluster's private Unix socket.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

#: Where Debian puts the server binaries (``postgresql-15`` on Debian 12).
BIN_GLOB = "/usr/lib/postgresql/*/bin"
USER = "tunnel"
#: Durability off: the tests need speed, never crash safety of the test cluster.
FAST_SETTINGS = ("fsync=off", "synchronous_commit=off", "full_page_writes=off", "max_connections=200",
                 "shared_buffers=32MB")


def bin_dir() -> Path | None:
    """The newest installed server binary directory, or None."""
    found = sorted(glob.glob(BIN_GLOB), key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0)
    env = os.environ.get("PG_BIN")
    if env:
        return Path(env)
    return Path(found[-1]) if found and (Path(found[-1]) / "initdb").exists() else None


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _server_user() -> str | None:
    """The account to run the server as: None to run as ourselves (not root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "tunnel-pg"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "tunnel-pg"],
                   check=False, capture_output=True)
    pwd.getpwnam("tunnel-pg")  # raises if that failed
    return "tunnel-pg"


class PostgresServer:
    """One PostgreSQL cluster; :meth:`start`, :meth:`stop` (and start again: data is kept),
    :meth:`create_database`, :meth:`url`, :meth:`destroy`."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        binaries = bin_dir()
        if binaries is None:
            raise RuntimeError("PostgreSQL server binaries not found (apt-get install postgresql)")
        self.bin = binaries
        self.host = host
        self.port = port or _free_port(host)
        self.password = secrets.token_urlsafe(18)
        self.user = _server_user()
        self.root = Path(tempfile.mkdtemp(prefix="tunnel-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root / "run"
        self.log_file = self.root / "server.log"
        os.chmod(self.root, 0o755)
        self.socket_dir.mkdir()
        if self.user:
            info = pwd.getpwnam(self.user)
            os.chown(self.root, info.pw_uid, info.pw_gid)
            os.chown(self.socket_dir, info.pw_uid, info.pw_gid)
        self._init()

    def _run(self, *argv: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        cmd = list(argv)
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        return subprocess.run(cmd, input=input, capture_output=True, text=True, check=check, timeout=120,
                              cwd=self.root)

    def _init(self) -> None:
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        if self.user:
            info = pwd.getpwnam(self.user)
            os.chown(pwfile, info.pw_uid, info.pw_gid)
        os.chmod(pwfile, 0o600)
        try:
            self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", USER, "--pwfile", str(pwfile),
                      "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8", "--no-sync",
                      "--locale=C")
        finally:
            pwfile.unlink()

    # ---- life cycle

    def start(self) -> "PostgresServer":
        options = [f"-c listen_addresses={self.host}", f"-p {self.port}", f"-k {self.socket_dir}"]
        options += [f"-c {s}" for s in FAST_SETTINGS]
        self._run(str(self.bin / "pg_ctl"), "start", "-w", "-t", "60", "-D", str(self.data), "-l",
                  str(self.log_file), "-o", " ".join(options))
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bin / "pg_ctl"), "stop", "-w", "-t", "60", "-D", str(self.data), "-m", mode,
                  check=False)

    def running(self) -> bool:
        return self._run(str(self.bin / "pg_ctl"), "status", "-D", str(self.data), check=False).returncode == 0

    def destroy(self) -> None:
        if self.running():
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    # ---- databases

    def psql(self, sql: str, database: str = "postgres") -> str:
        out = self._run(str(self.bin / "psql"), "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-h",
                        str(self.socket_dir), "-p", str(self.port), "-U", USER, "-d", database, "-c", sql)
        return out.stdout.strip()

    def create_database(self, name: str | None = None) -> str:
        name = name or "t_" + secrets.token_hex(6)
        self.psql(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def url(self, database: str, *, password: bool = True) -> str:
        secret = f":{self.password}" if password else ""
        return f"postgresql://{USER}{secret}@{self.host}:{self.port}/{database}"


@contextlib.contextmanager
def trust_server(max_connections: int = 64):
    """A PostgreSQL cluster of its own on 127.0.0.1 whose superuser ``postgres`` needs no
    password (trust), for real clients (psql, pgbench) through the tunnel; yields its port and
    destroys the cluster afterwards."""
    binaries = bin_dir()
    if binaries is None:
        raise RuntimeError("PostgreSQL server binaries not found (apt-get install postgresql)")
    user = _server_user()
    as_user = ["runuser", "-u", user, "--"] if user else []
    # Not under pytest's temporary directory: that one is private to the user running the tests.
    data = Path(tempfile.mkdtemp(prefix="tunnel-pg-"))
    if user:
        info = pwd.getpwnam(user)
        os.chown(data, info.pw_uid, info.pw_gid)
    port = _free_port("127.0.0.1")
    subprocess.run([*as_user, str(binaries / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"],
                   check=True, capture_output=True, timeout=120)
    options = (f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={data} -c fsync=off "
               f"-c synchronous_commit=off -c full_page_writes=off -c max_connections={max_connections}")
    try:
        subprocess.run([*as_user, str(binaries / "pg_ctl"), "-D", str(data), "-o", options, "-l",
                        str(data / "server.log"), "-w", "-t", "60", "start"], check=True, capture_output=True, timeout=90)
        yield port
    finally:
        subprocess.run([*as_user, str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(data, ignore_errors=True)
