"""A real database workload: PostgreSQL as the private service, ``pgbench`` as the worker.

The server is Debian's PostgreSQL in a temporary cluster (tests/helpers/postgres.py), loaded
once with ``pgbench -i -s SCALE``; each system then exposes its port and ``pgbench`` runs
through that system's endpoint: select-only (``-S``, one short round trip per transaction)
and the default TPC-B-like script (several statements per transaction, a write load).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

from .procs import REPO, HarnessError

PGBENCH = shutil.which("pgbench") or "/usr/lib/postgresql/15/bin/pgbench"
SCALE = 5
CLIENTS = 8
JOBS = 2


class Database:
    """The PostgreSQL server of the benchmark and the pgbench database in it."""

    def __init__(self) -> None:
        import sys

        sys.path.insert(0, str(REPO))
        from tests.helpers.postgres import PostgresServer

        self.server = PostgresServer().start()
        self.name = self.server.create_database("bench")
        self.port = self.server.port
        cp = subprocess.run([PGBENCH, "-i", "-q", "-s", str(SCALE), "-h", self.server.host, "-p", str(self.port),
                             "-U", "tunnel", self.name], env=self.env(), capture_output=True, text=True, timeout=300)
        if cp.returncode != 0:
            raise HarnessError(f"pgbench -i failed: {cp.stderr[-300:]}")

    def env(self) -> dict[str, str]:
        return dict(os.environ, PGPASSWORD=self.server.password)

    def run(self, host: str, port: int, seconds: float, select_only: bool) -> float:
        """Transactions per second of ``pgbench`` through ``host:port`` (excluding connection
        set-up); raises HarnessError when any transaction failed."""
        argv = [PGBENCH, "-n", "-c", str(CLIENTS), "-j", str(JOBS), "-T", str(max(1, int(seconds))),
                "-h", host, "-p", str(port), "-U", "tunnel", self.name]
        if select_only:
            argv.insert(1, "-S")
        cp = subprocess.run(argv, env=self.env(), capture_output=True, text=True, timeout=seconds + 120)
        text = cp.stdout + cp.stderr
        failed = re.search(r"number of failed transactions: (\d+)", text)
        if cp.returncode != 0 or (failed and int(failed.group(1))):
            raise HarnessError(f"pgbench through {host}:{port} failed: {text.strip()[-300:]}")
        tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", text)
        if not tps:
            raise HarnessError(f"pgbench: no tps in {text.strip()[-300:]!r}")
        return float(tps.group(1))

    def close(self) -> None:
        self.server.destroy()
