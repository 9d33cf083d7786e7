"""The private services every system exposes: echo, iperf3 server, nginx (static file), a
Redis server, and the bulk upload/download service of the pytest-benchmark cases."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .procs import LOOPBACK, REPO, HarnessError, ProcessRegistry, free_port, python, \
    python_env, wait_listening

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
IPERF3 = shutil.which("iperf3") or "/usr/bin/iperf3"
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"

# 1 KiB static page: a small API-style response.
STATIC_BODY = (b"<!doctype html><title>bench</title><pre>" + b"x" * 960 + b"</pre>\n")[:1024]


@dataclass
class Services:
    echo: int = 0
    iperf: int = 0
    http: int = 0
    redis: int = 0
    procs: list[subprocess.Popen] = field(default_factory=list)

    def ports(self) -> dict[str, int]:
        return {k: v for k, v in (("echo", self.echo), ("iperf", self.iperf),
                                  ("http", self.http), ("redis", self.redis)) if v}


def start_echo(reg: ProcessRegistry, host: str = LOOPBACK,
               netns: str | None = None) -> tuple[int, subprocess.Popen]:
    """The echo server on ``host`` (inside network namespace ``netns`` when given)."""
    port = free_port()
    p = reg.spawn([python(), "-m", "bench.peers.echo", "--host", host, "--port", str(port)],
                  "echo", env=python_env(), cwd=REPO, netns=netns)
    wait_listening(port, 15, p, "echo server", netns=netns)
    return port, p


def start_bulk(reg: ProcessRegistry, host: str = LOOPBACK) -> tuple[int, subprocess.Popen]:
    """The bulk upload/download service (:mod:`bench.peers.bulk`) on ``host``."""
    port = free_port()
    p = reg.spawn([python(), "-m", "bench.peers.bulk", "--host", host, "--port", str(port)],
                  "bulk", env=python_env(), cwd=REPO)
    wait_listening(port, 15, p, "bulk service")
    return port, p


def start_iperf(reg: ProcessRegistry, host: str = LOOPBACK,
                netns: str | None = None) -> tuple[int, subprocess.Popen]:
    """``iperf3 -s`` on ``host`` (inside network namespace ``netns`` when given)."""
    port = free_port()
    p = reg.spawn([IPERF3, "-s", "-B", host, "-p", str(port)], "iperf3-server", netns=netns)
    wait_listening(port, 10, p, "iperf3 server", netns=netns)
    return port, p


NGINX_CONF = """\
worker_processes 1;
daemon off;
master_process on;
user root;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
worker_rlimit_nofile 16384;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 1000000;
    server {{
        listen {host}:{port} backlog=4096;
        root {tmp}/www;
        location / {{ index index.html; }}
    }}
}}
"""


def start_nginx(reg: ProcessRegistry, tmp: Path | None = None) -> tuple[int, subprocess.Popen]:
    tmp = Path(tmp or tempfile.mkdtemp(prefix="bench-nginx-"))
    (tmp / "www").mkdir(parents=True, exist_ok=True)
    (tmp / "www" / "index.html").write_bytes(STATIC_BODY)
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, host=LOOPBACK, port=port))
    p = reg.spawn([NGINX, "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(conf)], "nginx")
    try:
        wait_listening(port, 10, p, "nginx")
    except HarnessError as e:
        err = (tmp / "error.log").read_text(errors="replace") if (tmp / "error.log").exists() else ""
        raise HarnessError(f"{e}: {err[-500:]}") from None
    return port, p


def start_redis(reg: ProcessRegistry, tmp: Path) -> tuple[int, subprocess.Popen]:
    """A private ``redis-server`` on loopback: in memory only (no snapshots, no append-only
    file), so the figures are the network path's and Redis's, not the disk's."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    p = reg.spawn([REDIS_SERVER, "--bind", LOOPBACK, "--port", str(port), "--save", "", "--appendonly", "no",
                   "--dir", str(tmp), "--protected-mode", "no", "--maxclients", "1000"], "redis-server")
    wait_listening(port, 10, p, "redis-server")
    return port, p


def start_services(reg: ProcessRegistry, which: set[str], tmp: Path) -> Services:
    """Start the services named in ``which`` (subset of echo, iperf, http, redis)."""
    s = Services()
    if "echo" in which:
        s.echo, p = start_echo(reg)
        s.procs.append(p)
    if "iperf" in which:
        s.iperf, p = start_iperf(reg)
        s.procs.append(p)
    if "http" in which:
        s.http, p = start_nginx(reg, tmp / "nginx")
        s.procs.append(p)
    if "redis" in which:
        s.redis, p = start_redis(reg, tmp / "redis")
        s.procs.append(p)
    return s
