"""deploy/systemd: the units pass ``systemd-analyze verify`` (no error, no warning) and
``systemd-analyze security`` (exposure at most 2.0) in a scratch root that holds the
ExecStart binaries; a broken unit fails both ways; the env-file example is a valid agent
configuration; and the agent started as the unit starts it (environment file, the JWT as a
credential in $CREDENTIALS_DIRECTORY, no path given) registers with a real relay."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers.processes import PY, ROOT, Proc, _env

UNITS = ROOT / "deploy" / "systemd"
ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
SYSTEM_UNITS = Path("/usr/lib/systemd/system")

pytestmark = pytest.mark.skipif(not os.access(ANALYZE, os.X_OK) or not SYSTEM_UNITS.is_dir(),
                                reason="systemd-analyze and systemd's units are not installed")


def scratch_root(tmp_path: Path, units: dict[str, str], binaries=("tunnel-relay", "tunnel-agent")) -> Path:
    """A root with systemd's own units, ours (``units``: name -> text) and stub ExecStart binaries."""
    root = tmp_path / "root"
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree(SYSTEM_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for name, text in units.items():
        (root / "etc/systemd/system" / name).write_text(text)
    (root / "usr/local/bin").mkdir(parents=True)
    (root / "bin").mkdir()
    for path in [f"usr/local/bin/{name}" for name in binaries] + ["bin/kill"]:  # kill: ExecReload
        stub = root / path
        stub.write_text("#!/bin/sh\n")
        stub.chmod(0o755)
    return root


def ours() -> dict[str, str]:
    return {p.name: p.read_text() for p in UNITS.glob("*.service")}


def verify(root: Path, *names: str) -> subprocess.CompletedProcess:
    return subprocess.run([ANALYZE, "verify", "--man=no", f"--root={root}", *names], capture_output=True, text=True,
                          timeout=60, cwd=root)


def security(root: Path, name: str) -> subprocess.CompletedProcess:
    return subprocess.run([ANALYZE, "security", "--offline=yes", "--threshold=20", f"--root={root}", name],
                          capture_output=True, text=True, timeout=60, cwd=root)


def clean(out: subprocess.CompletedProcess) -> bool:
    """What the units must achieve: exit 0 and not one warning."""
    return out.returncode == 0 and not (out.stdout + out.stderr).strip()


NAMES = ("tunnel-relay.service", "tunnel-agent.service", "tunnel-agent@orders.service")


def test_units_verify_clean_and_are_sandboxed(tmp_path):
    assert set(ours()) == {"tunnel-relay.service", "tunnel-agent.service", "tunnel-agent@.service"}
    root = scratch_root(tmp_path, ours())
    out = verify(root, *NAMES)
    assert clean(out), out.stdout + out.stderr
    for name in NAMES:
        out = security(root, name)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr
        assert "Overall exposure level" in out.stdout


@pytest.mark.parametrize("name", sorted(ours()))
def test_units_say_what_matters(name):
    lines = set(ours()[name].splitlines())
    for directive in ("NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
                      "DynamicUser=yes", "CapabilityBoundingSet=", "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
                      "Restart=on-failure", "KillSignal=SIGTERM", "StartLimitBurst=10"):
        assert directive in lines, f"{name} lacks {directive}"
    assert not any(line.startswith(("Environment=REGISTRATION_JWT", "Environment=RELAY_ADMIN_TOKEN")) for line in lines)
    if name.startswith("tunnel-agent"):
        assert any(line.startswith("LoadCredential=registration-jwt:") for line in lines)
        assert "RestartPreventExitStatus=2 3" in lines
    else:
        assert {"StateDirectory=tunnel-relay", "Environment=RELAY_STATE_DIR=/var/lib/tunnel-relay"} <= lines
        # The database URL is a credential (without the file: SQLite, the default), never in the environment.
        assert {"LoadCredential=database-url:/etc/tunnel-relay/database-url",
                "SetCredential=database-url:sqlite:///var/lib/tunnel-relay/relay.db"} <= lines
        assert not any(line.startswith("Environment=RELAY_DATABASE_URL") for line in lines)


def test_the_readme_installs_secrets_readable_by_root_only():
    readme = (ROOT / "README.md").read_text()
    assert "install -m 0600 deploy/systemd/tunnel-relay.env.example /etc/tunnel-relay/relay.env" in readme
    assert "install -m 0644 deploy/systemd/tunnel-relay.env.example" not in readme
    assert "/etc/tunnel-relay/database-url" in readme and "RELAY_DATABASE_URL_FILE" in readme


def test_broken_units_fail(tmp_path):
    units = ours()
    typo = units["tunnel-agent.service"].replace("ProtectSystem=strict", "ProtectSytem=strict")
    out = verify(scratch_root(tmp_path / "typo", {"tunnel-agent.service": typo}), "tunnel-agent.service")
    assert not clean(out) and "Unknown key 'ProtectSytem'" in out.stdout + out.stderr

    bad_value = units["tunnel-relay.service"].replace("Restart=on-failure", "Restart=sometimes")
    out = verify(scratch_root(tmp_path / "value", {"tunnel-relay.service": bad_value}), "tunnel-relay.service")
    assert not clean(out) and "restart specifier" in out.stdout + out.stderr

    out = verify(scratch_root(tmp_path / "nobin", units, binaries=("tunnel-relay",)), "tunnel-agent.service")
    assert not clean(out) and out.returncode != 0 and "/usr/local/bin/tunnel-agent" in out.stdout + out.stderr

    bare = "\n".join(line for line in units["tunnel-agent.service"].splitlines()
                     if not line.startswith(("Protect", "Private", "Restrict", "SystemCall", "Capability", "NoNew",
                                             "DynamicUser", "LockPersonality", "RemoveIPC", "UMask", "DevicePolicy",
                                             "ProcSubset")))
    out = security(scratch_root(tmp_path / "bare", {"tunnel-agent.service": bare}), "tunnel-agent.service")
    assert out.returncode != 0, out.stdout[-1000:]


def env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as systemd's EnvironmentFile= reads them (comments and blanks skipped)."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def test_env_examples_are_valid(tmp_path):
    from agent import config as agent_config

    agent_env = env_file(UNITS / "tunnel-agent.env.example")
    assert not any(k.startswith("REGISTRATION_JWT") for k in agent_env), "the JWT belongs in the credential"
    ca = tmp_path / "ca.pem"
    from relay.state import pki

    pki.ensure_pki(tmp_path / "state")
    ca.write_bytes((tmp_path / "state" / "ca.pem").read_bytes())
    (tmp_path / "registration-jwt").write_text("a.b.c\n")
    conf = agent_config.load({**agent_env, "RELAY_CA_FILE": str(ca), "CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert conf.token == "a.b.c" and conf.targets[0].port == 5432

    relay_cli = (ROOT / "relay" / "cli.py").read_text()
    for key in env_file(UNITS / "tunnel-relay.env.example"):
        assert f'"{key}"' in relay_cli, f"tunnel-relay does not read {key}"


def test_agent_runs_as_the_unit_runs_it(relay, service_factory, tmp_path):
    """EnvironmentFile= plus LoadCredential=: the JWT reaches the agent without a path or a variable."""
    service = service_factory("echo")
    customer = relay.create_customer("acme")
    token = relay.jwt("--customer-id", customer)
    credentials = tmp_path / "credentials"
    credentials.mkdir(mode=0o700)
    (credentials / "registration-jwt").write_text(token + "\n")
    env = {**env_file(UNITS / "tunnel-agent.env.example"), "RELAY_URL": f"wss://127.0.0.1:{relay.port}",
           "RELAY_CA_FILE": relay.ca_file, "APP_HOST": "127.0.0.1", "APP_PORT": str(service.port),
           "CREDENTIALS_DIRECTORY": str(credentials)}
    agent = Proc("agent-unit", [PY, "-m", "agent"], _env(**env), tmp_path / "agent-unit.log").start()
    try:
        relay.wait_available(customer, env["NAME"])
        visible = Path(f"/proc/{agent.pid}/environ").read_bytes() + Path(f"/proc/{agent.pid}/cmdline").read_bytes()
        assert token.encode() not in visible
    finally:
        assert agent.stop() == 0, agent.log()[-2000:]
    assert token not in agent.log()


def test_the_readme_puts_the_programs_where_the_units_run_them(tmp_path):
    """The README's systemd section links tunnel-relay and tunnel-agent into /usr/local/bin (the
    units' ExecStart): done as it says in a scratch root without them, the units verify clean."""
    import shlex

    readme = (ROOT / "README.md").read_text()
    steps = readme.split("### The relay as a service (systemd)")[1].split("```sh")[1].split("```")[0]
    links = [shlex.split(line)[1:] for line in steps.splitlines() if line.startswith("sudo ln ")]
    assert links, "the README does not say how the programs reach /usr/local/bin"
    root = scratch_root(tmp_path, ours(), binaries=())
    for args in links:
        *sources, dest = [a for a in args[1:] if not a.startswith("-")]
        assert dest == "/usr/local/bin/", args
        for source in sources:  # what `pip install` put into the virtual environment
            stub = root / source.lstrip("/")
            stub.parent.mkdir(parents=True, exist_ok=True)
            stub.write_text("#!/bin/sh\n")
            stub.chmod(0o755)
            (root / dest.lstrip("/") / Path(source).name).symlink_to(source)
    out = verify(root, *NAMES)
    assert clean(out), out.stdout + out.stderr
