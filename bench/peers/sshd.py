"""A private OpenSSH server and ``ssh -R`` clients (the agent-equivalent).

:class:`PrivateSshd` makes a temporary host key and user key in its own directory and runs
``sshd -D -e -f <cfg>`` on a free port of ``host`` (loopback by default; inside a network
namespace when given) with a config of its own (no PAM, key-only root login, TCP forwarding
on, GatewayPorts off). :meth:`PrivateSshd.forward` starts ``ssh -N -R
127.0.0.1:FWD:127.0.0.1:SERVICE`` (one ``-R`` per service, all on one connection) as the
agent-equivalent and waits until the remote listeners exist; the forwarded ports, on sshd's
loopback, are the endpoints the integration worker uses.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from .procs import LOOPBACK, HarnessError, ProcessRegistry, free_port, log_tail, \
    wait_listening

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
SSH = shutil.which("ssh") or "/usr/bin/ssh"
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"

SSHD_CONFIG = """\
Port {port}
ListenAddress {host}
HostKey {dir}/host_ed25519
PidFile {dir}/sshd.pid
AuthorizedKeysFile {dir}/authorized_keys
StrictModes no
UsePAM no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
AllowTcpForwarding yes
GatewayPorts no
X11Forwarding no
PermitTTY no
PrintMotd no
UseDNS no
MaxStartups 200:30:400
LogLevel ERROR
"""


def ssh_available() -> str | None:
    """None when sshd, ssh and ssh-keygen exist, else why not."""
    for tool in (SSHD, SSH, SSH_KEYGEN):
        if not os.path.exists(tool):
            return f"{tool} not installed"
    return None


class PrivateSshd:
    def __init__(self, reg: ProcessRegistry, directory: Path, host: str = LOOPBACK,
                 netns: str | None = None) -> None:
        self.reg = reg
        self.dir = Path(directory)
        self.host = host
        self.netns = netns
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.key = self.dir / "user_ed25519"

    def start(self) -> int:
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        for name in ("host_ed25519", "user_ed25519"):
            path = self.dir / name
            if not path.exists():
                subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", "bench",
                                "-f", str(path)], check=True, timeout=30,
                               stdin=subprocess.DEVNULL)
        (self.dir / "authorized_keys").write_bytes((self.dir / "user_ed25519.pub").read_bytes())
        os.chmod(self.dir / "authorized_keys", 0o600)
        # sshd refuses to start without its privilege separation directory.
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        self.port = free_port()
        cfg = self.dir / "sshd_config"
        cfg.write_text(SSHD_CONFIG.format(port=self.port, dir=self.dir, host=self.host))
        self.proc = self.reg.spawn([SSHD, "-D", "-e", "-f", str(cfg)], "sshd", netns=self.netns)
        try:
            wait_listening(self.port, 10, self.proc, "sshd", netns=self.netns)
        except HarnessError as e:
            raise HarnessError(f"{e}\n{log_tail(self.proc)}") from None
        return self.port

    def client_argv(self, forwards: list[tuple[int, int]], cipher: str | None = None) -> list[str]:
        """``ssh -N`` argv with one ``-R 127.0.0.1:FWD:127.0.0.1:SERVICE`` per pair."""
        argv = [SSH, "-N", "-F", "/dev/null",
                "-o", "ExitOnForwardFailure=yes", "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
                "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR",
                "-o", "ServerAliveInterval=30",
                "-i", str(self.key), "-p", str(self.port)]
        if cipher:
            argv += ["-c", cipher]
        for fwd, service in forwards:
            argv += ["-R", f"{LOOPBACK}:{fwd}:{LOOPBACK}:{service}"]
        return argv + [f"root@{self.host}"]

    def forward(self, service_port: int, cipher: str | None = None,
                name: str = "ssh") -> tuple[int, subprocess.Popen]:
        """Start an ``ssh -R`` client; return (endpoint port, client process)."""
        ports, proc = self.forward_many([service_port], cipher, name)
        return ports[0], proc

    def forward_many(self, service_ports: list[int], cipher: str | None = None, name: str = "ssh",
                     netns: str | None = None) -> tuple[list[int], subprocess.Popen]:
        """One ``ssh -R`` client (inside ``netns`` when given) forwarding every service over
        one connection; return (endpoint ports in the same order, client process)."""
        forwards = [(free_port(), svc) for svc in service_ports]
        proc = self.reg.spawn(self.client_argv(forwards, cipher), name, netns=netns)
        try:
            for fwd, _ in forwards:
                wait_listening(fwd, 20, proc, f"ssh -R listener on {fwd}", netns=self.netns)
        except HarnessError as e:
            self.reg.stop(proc)
            raise HarnessError(f"{e}\n{log_tail(proc)}") from None
        return [fwd for fwd, _ in forwards], proc

    def stop(self) -> None:
        if self.proc is not None:
            self.reg.stop(self.proc)
            self.proc = None
