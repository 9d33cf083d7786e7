"""stunnel as a peer: a TLS tunnel in C without multiplexing, what TLS alone costs here.

For each service :class:`Stunnel` runs two ``stunnel4`` processes on loopback: the worker side
(``client = yes``: accepts the worker's plain TCP on the endpoint port, opens one TLS connection
per worker connection) and the service side (accepts TLS, dials the service): the
agent-equivalent, whose CPU and RSS are read, as it sits next to the private service. TLS 1.3 with
TLS_AES_128_GCM_SHA256 (the cipher ``ssh -c aes128-gcm`` uses), the certificate checked against a
private CA and the name ``localhost``, Nagle off on every socket as our carrier and ssh do.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from .procs import LOOPBACK, HarnessError, ProcessRegistry, free_port, log_tail, wait_listening

STUNNEL = shutil.which("stunnel4") or shutil.which("stunnel") or "/usr/bin/stunnel4"

COMMON = """\
foreground = yes
pid =
debug = err
syslog = no
socket = l:TCP_NODELAY=1
socket = r:TCP_NODELAY=1
sslVersionMin = TLSv1.3
ciphersuites = TLS_AES_128_GCM_SHA256

[tunnel]
accept = {host}:{accept}
connect = {host}:{connect}
"""
SERVER = COMMON + "cert = {cert}\nkey = {key}\n"
CLIENT = COMMON + "client = yes\nCAfile = {ca}\nverifyChain = yes\ncheckHost = localhost\n"


def stunnel_available() -> str | None:
    """None when stunnel can run, else why not."""
    if shutil.which(STUNNEL) is None:
        return f"{STUNNEL} not installed (apt-get install stunnel4; scripts/setup.sh does)"
    return None


class Stunnel:
    def __init__(self, reg: ProcessRegistry, directory: Path, host: str = LOOPBACK) -> None:
        self.reg = reg
        self.dir = Path(directory)
        self.host = host
        self.pki = None

    def start(self) -> None:
        from tests.helpers import make_pki

        self.dir.mkdir(parents=True, exist_ok=True)
        self.pki = make_pki(self.dir, names=("localhost",))

    def _spawn(self, template: str, accept: int, connect: int, name: str) -> subprocess.Popen:
        conf = self.dir / f"{name}.conf"
        conf.write_text(template.format(host=self.host, accept=accept, connect=connect, cert=self.pki.cert_file,
                                        key=self.pki.key_file, ca=self.pki.ca_file))
        proc = self.reg.spawn([STUNNEL, str(conf)], name)
        try:
            wait_listening(accept, 10, proc, name)
        except HarnessError as e:
            self.reg.stop(proc)
            raise HarnessError(f"{e}\n{log_tail(proc)}") from None
        return proc

    def forward(self, service_port: int, name: str = "stunnel") -> tuple[int, subprocess.Popen, subprocess.Popen]:
        """Start the pair for one service: (endpoint port, service-side process, worker-side process)."""
        tls_port, endpoint = free_port(), free_port()
        server = self._spawn(SERVER, tls_port, service_port, f"{name}-service-side")
        try:
            client = self._spawn(CLIENT, endpoint, tls_port, f"{name}-worker-side")
        except HarnessError:
            self.reg.stop(server)
            raise
        return endpoint, server, client
