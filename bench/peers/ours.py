"""Our relay and agents, driven only through the command-line contract of PRODUCT.md.

    tunnel-relay serve --state-dir D --listen 127.0.0.1:P --admin-listen 127.0.0.1:A \
        --service-host 127.0.0.1
    tunnel-relay --state-dir D customers create bench            -> customer id
    tunnel-relay --state-dir D resources registration-jwt --customer-id ID   -> JWT
    RELAY_URL=wss://127.0.0.1:P (or quic://) RELAY_CA_FILE=D/ca.pem NAME=.. APP_HOST=..
        APP_PORT=.. REGISTRATION_JWT=.. tunnel-agent
    tunnel-relay --state-dir D resources list --output json      -> endpoint, status

The console scripts are used when they are on PATH, else ``python -m relay`` / ``python -m
agent`` from the repository. :func:`ours_available` says why the systems must be skipped when
the commands are not there yet.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from .procs import LOOPBACK, REPO, HarnessError, ProcessRegistry, free_port, log_tail, \
    python, python_env, wait_listening, wait_until


def tool(name: str) -> list[str]:
    """argv prefix of ``tunnel-relay`` / ``tunnel-agent``."""
    path = shutil.which(name)
    if path:
        return [path]
    return [python(), "-m", name.split("-", 1)[1]]


def ours_available(reg: ProcessRegistry) -> str | None:
    """None when both commands answer ``--help``; else the reason to skip our systems."""
    for name, must in (("tunnel-relay", "serve"), ("tunnel-agent", "RELAY_URL")):
        try:
            cp = reg.run(tool(name) + ["--help"], f"probe-{name}", timeout=30, env=python_env(),
                         cwd=REPO)
        except (HarnessError, OSError) as e:
            return f"{name} --help failed: {e}"
        text = cp.stdout + cp.stderr
        if cp.returncode != 0:
            last = text.strip().splitlines()[-1:] or ["(no output)"]
            return f"{name} not available yet (exit {cp.returncode}: {last[0][:160]})"
        if must not in text:
            return f"{name} --help does not mention {must!r}: not implemented yet"
    return None


def _rows(text: str) -> list[dict]:
    data = json.loads(text)
    if isinstance(data, dict):
        data = data.get("resources", data.get("items", []))
    return list(data)


class OurRelay:
    """A relay listening for agents on ``host`` (inside network namespace ``netns`` when
    given; its admin API and resource endpoints stay on that namespace's loopback)."""

    def __init__(self, reg: ProcessRegistry, state_dir: Path, host: str = LOOPBACK,
                 netns: str | None = None) -> None:
        self.reg = reg
        self.state = Path(state_dir)
        self.host = host
        self.netns = netns
        self._agents = 0
        self.port = 0
        self.admin_port = 0
        self.proc: subprocess.Popen | None = None
        self.customer = ""
        self.env = python_env()

    def cmd(self, *args: str, timeout: float = 30.0) -> str:
        cp = self.reg.run(tool("tunnel-relay") + ["--state-dir", str(self.state), *args],
                          f"relay-{args[0]}", timeout=timeout, env=self.env, cwd=REPO,
                          netns=self.netns)
        if cp.returncode != 0:
            raise HarnessError(f"tunnel-relay {' '.join(args[:2])} failed (exit {cp.returncode}): "
                               f"{cp.stderr.strip()[-300:]}")
        return cp.stdout.strip()

    def start(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        self.port = free_port(both=True)       # TCP for WSS, UDP for QUIC, same number
        self.admin_port = free_port()
        self.proc = self.reg.spawn(
            tool("tunnel-relay") + ["serve", "--state-dir", str(self.state),
                                    "--listen", f"{self.host}:{self.port}",
                                    "--admin-listen", f"{LOOPBACK}:{self.admin_port}",
                                    "--service-host", LOOPBACK],
            "relay", env=self.env, cwd=REPO, netns=self.netns)
        alive = lambda: self.proc.poll() is None  # noqa: E731
        try:
            wait_until(lambda: (self.state / "admin.json").exists(), 30, "relay admin.json", alive)
            wait_listening(self.port, 30, self.proc, "relay agent port", netns=self.netns)

            def listed() -> bool:
                try:
                    _rows(self.cmd("resources", "list", "--output", "json"))
                    return True
                except (HarnessError, ValueError):
                    return False
            wait_until(listed, 30, "relay admin API (resources list)", alive, interval=0.2)
            out = self.cmd("customers", "create", "bench")
        except HarnessError as e:
            tail = log_tail(self.proc)
            last = tail.strip().splitlines()[-1:] or [""]
            raise HarnessError(f"{e} (relay: {last[0][:200]})\n{tail}") from None
        self.customer = out.split()[-1] if out else ""
        if not self.customer:
            raise HarnessError("customers create printed no id")

    def registration_jwt(self) -> str:
        out = self.cmd("resources", "registration-jwt", "--customer-id", self.customer)
        return out.split()[-1]

    def expose(self, name: str, service_port: int, transport: str) -> tuple[int, subprocess.Popen]:
        """Start an agent serving ``127.0.0.1:service_port`` as resource ``name``; return the
        endpoint port and the agent process once the resource is AVAILABLE."""
        ports, proc = self.expose_many({name: service_port}, transport)
        return ports[name], proc

    def expose_many(self, services: dict[str, int], transport: str,
                    agent_netns: str | None = None) -> tuple[dict[str, int], subprocess.Popen]:
        """Start one agent (inside ``agent_netns`` when given) serving each
        ``name -> 127.0.0.1:port`` over one link (a config file when there are several);
        return the endpoint port of each name and the agent process once all are AVAILABLE."""
        self._agents += 1
        env = dict(self.env, RELAY_URL=f"{transport}://{self.host}:{self.port}",
                   RELAY_CA_FILE=str(self.state / "ca.pem"),
                   REGISTRATION_JWT=self.registration_jwt())
        if len(services) == 1:
            [(name, port)] = services.items()
            env.update(NAME=name, APP_HOST=LOOPBACK, APP_PORT=str(port))
        else:
            conf = self.state.parent / f"agent-{self._agents}.toml"
            conf.write_text("".join(f'[[resources]]\nname = "{name}"\nhost = "{LOOPBACK}"\n'
                                    f"port = {port}\n" for name, port in services.items()))
            env["AGENT_CONFIG_FILE"] = str(conf)
        label = "-".join(services)
        proc = self.reg.spawn(tool("tunnel-agent"), f"agent-{label}", env=env, cwd=REPO,
                              netns=agent_netns)

        def available() -> dict[str, dict] | None:
            rows = {row.get("name"): row for row in _rows(self.cmd("resources", "list", "--output", "json"))
                    if row.get("customer_id", self.customer) == self.customer}
            if all(rows.get(n, {}).get("status") == "AVAILABLE" for n in services):
                return rows
            return None
        try:
            rows = wait_until(available, 45, f"resources {label} AVAILABLE",
                              lambda: proc.poll() is None, interval=0.2)
        except HarnessError as e:
            self.reg.stop(proc)
            tail = log_tail(proc)
            last = tail.strip().splitlines()[-1:] or [""]
            raise HarnessError(f"{e} (agent: {last[0][:200]})\n{tail}") from None
        ports = {}
        for name in services:
            host, _, port = str(rows[name]["endpoint"]).rpartition(":")
            if host not in ("127.0.0.1", "localhost", ""):
                self.reg.stop(proc)
                raise HarnessError(f"endpoint {rows[name]['endpoint']} is not on loopback")
            ports[name] = int(port)
        return ports, proc

    def stop(self) -> None:
        if self.proc is not None:
            self.reg.stop(self.proc)
            self.proc = None
