"""A real nginx in front of a WebSocket upstream, for adapter and end-to-end tests.

``start_nginx(upstream_port, cert_file, key_file)`` runs ``/usr/sbin/nginx`` in the
foreground on a free loopback port, terminating TLS with the given certificate and proxying
WebSocket upgrades to ``127.0.0.1:upstream_port`` (plain ``ws://``, or ``https://`` re-encrypt
with ``upstream_tls=True``). Everything nginx writes (config, pid, logs, temp files) stays in a
private temporary directory. Call the returned ``stop()`` (idempotent) when done.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

NGINX = os.environ.get("TUNNEL_TEST_NGINX", "/usr/sbin/nginx")

__all__ = ["NGINX", "NginxProxy", "nginx_available", "start_nginx", "free_port"]


def nginx_available() -> bool:
    return os.path.isfile(NGINX) and os.access(NGINX, os.X_OK)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


_CONF = """\
worker_processes 1;
error_log {dir}/error.log info;
pid {dir}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;

    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      close;
    }}

    upstream tunnel_relay {{
        server 127.0.0.1:{upstream_port};
    }}

    server {{
        listen 127.0.0.1:{port} ssl;
        server_name localhost;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;

        location {location} {{
            proxy_pass {scheme}://tunnel_relay;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
            proxy_buffering off;
{upstream_tls}        }}
    }}
}}
"""

_UPSTREAM_TLS = """\
            proxy_ssl_server_name on;
            proxy_ssl_name {name};
            proxy_ssl_verify {verify};
            proxy_ssl_trusted_certificate {ca};
            proxy_ssl_protocols TLSv1.2 TLSv1.3;
"""


@dataclass
class NginxProxy:
    port: int
    directory: Path
    process: subprocess.Popen
    _stopped: bool = field(default=False, repr=False)

    @property
    def url(self) -> str:
        """The wss:// URL an agent dials to reach the upstream through nginx."""
        return f"wss://localhost:{self.port}"

    def logs(self) -> str:
        try:
            return (self.directory / "error.log").read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self.process.poll() is None:
            self.process.terminate()  # SIGTERM: fast shutdown
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> "NginxProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_nginx(upstream_port: int, cert_file, key_file, *, upstream_tls: bool = False,
                upstream_ca_file=None, upstream_name: str = "localhost", location: str = "/",
                port: int | None = None, startup_timeout: float = 20.0) -> NginxProxy:
    """Start nginx in front of ``127.0.0.1:upstream_port``; return once it accepts connections.

    ``upstream_tls`` re-encrypts towards the upstream (verified against ``upstream_ca_file``
    with the name ``upstream_name`` when given). Raises RuntimeError with nginx's error log if
    it does not come up.
    """
    if not nginx_available():
        raise RuntimeError(f"nginx not found at {NGINX}")
    directory = Path(tempfile.mkdtemp(prefix="tunnel-nginx-"))
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (directory / sub).mkdir()
    last_error = ""
    for _attempt in range(5):  # a free port may be taken by someone else before nginx binds it
        listen_port = port or free_port()
        extra = ""
        if upstream_tls:
            extra = _UPSTREAM_TLS.format(
                name=upstream_name, verify="on" if upstream_ca_file else "off",
                ca=os.fspath(upstream_ca_file) if upstream_ca_file else os.fspath(cert_file))
        conf = directory / "nginx.conf"
        conf.write_text(_CONF.format(
            dir=directory, port=listen_port, upstream_port=upstream_port, cert=os.fspath(cert_file),
            key=os.fspath(key_file), location=location, scheme="https" if upstream_tls else "http",
            upstream_tls=extra))
        process = subprocess.Popen(
            [NGINX, "-p", str(directory), "-c", str(conf), "-e", str(directory / "error.log"),
             "-g", "daemon off; master_process on;"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        proxy = NginxProxy(listen_port, directory, process)
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                break
            try:
                with socket.create_connection(("127.0.0.1", listen_port), timeout=1):
                    return proxy
            except OSError:
                time.sleep(0.02)
        stderr = b""
        if process.poll() is None:
            process.kill()
        try:
            stderr = process.communicate(timeout=10)[1] or b""
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass
        last_error = stderr.decode(errors="replace") + proxy.logs()
        if port is not None or "Address already in use" not in last_error:
            break
    shutil.rmtree(directory, ignore_errors=True)
    raise RuntimeError(f"nginx did not start: {last_error[-2000:]}")
