"""The previous release against this tree, both ways (docs/PROTOCOL.md, "Versions and
compatibility"): its agent against this relay, and this agent against its relay, through the
essentials: registration, streams both ways with half-closes, a reconnection after the relay
is killed and started again, and a graceful stop of the agent.

The previous release is the newest ``release:`` commit in CHANGELOG.md, taken from git
history (``git archive``: no tag needed) into a temporary directory and run pure-Python
(``TUNNEL_PURE_PYTHON=1``: nothing to build), with only that directory on its path."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading

import pytest

from tests.helpers import wait_until
from tests.helpers.processes import PY, ROOT, PrivateService, Proc, Relay, _env, connect, recv_all

RELEASE = re.compile(r"^## (\S+) .*?\n+release: ([0-9a-f]{40})$", re.MULTILINE)


def previous_release() -> tuple[str, str]:
    """``(version, commit)`` of the newest release named in CHANGELOG.md."""
    found = RELEASE.findall((ROOT / "CHANGELOG.md").read_text())
    assert found, "CHANGELOG.md names no release commit ('release: <40 hex digits>' under a version heading)"
    return found[0]


@pytest.fixture(scope="module")
def old_tree(tmp_path_factory):
    """The previous release's files, from git history."""
    version, commit = previous_release()
    git = ["git", "-C", str(ROOT)]
    try:
        present = subprocess.run([*git, "cat-file", "-e", f"{commit}^{{commit}}"], capture_output=True).returncode == 0
    except FileNotFoundError:
        pytest.fail("git is missing: the compatibility test takes the previous release from git history")
    if not present:
        shallow = subprocess.run([*git, "rev-parse", "--is-shallow-repository"], capture_output=True, text=True)
        assert shallow.stdout.strip() != "true", (
            f"release {version} ({commit}) is not in this shallow clone: clone with its history")
        raise AssertionError(f"release {version}'s commit {commit} is not in this repository's history")
    tree = tmp_path_factory.mktemp(f"release-{version}")
    archive = subprocess.run([*git, "archive", "--format=tar", commit], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    # Only the old tree's packages load, even run from this checkout.
    where = subprocess.run([*old_prefix(tree), PY, "-c", "import agent, relay, tunnel; "
                            "print(agent.__file__, relay.__file__, tunnel.__file__, tunnel.__version__)"],
                           capture_output=True, text=True, cwd=ROOT, env=_env(), check=True).stdout.split()
    assert all(path.startswith(str(tree)) for path in where[:3]) and where[3] == version, where
    return version, tree


def old_prefix(tree) -> list[str]:
    """Runs a command with only the old tree on Python's path (not the working directory)."""
    return ["env", f"PYTHONPATH={tree}", "PYTHONSAFEPATH=1", "TUNNEL_PURE_PYTHON=1"]


def start_agent(workdir, name: str, relay: Relay, token: str, port: int, prefix: list[str]) -> Proc:
    env = _env(RELAY_URL=relay.url, REGISTRATION_JWT=token, NAME="db", APP_HOST="127.0.0.1", APP_PORT=port,
               RELAY_CA_FILE=relay.ca_file, LOG_LEVEL="DEBUG")
    return Proc(name, [*prefix, PY, "-m", "agent"], env, workdir / f"{name}.log").start()


def streams_both_ways(addr: tuple[str, int]) -> None:
    """Several streams at once, each carrying bytes both ways and a half-close each way: the
    worker sends, half-closes, and reads back exactly what it sent, then the service's end."""
    payloads = [os.urandom(size) for size in (1, 1000, 300_000, 2_000_000)]
    answers: dict[int, bytes | Exception] = {}

    def worker(i: int) -> None:
        try:
            with connect(addr) as s:
                s.sendall(payloads[i])
                s.shutdown(socket.SHUT_WR)
                answers[i] = recv_all(s)
        except OSError as exc:
            answers[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(payloads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, payload in enumerate(payloads):
        assert answers.get(i) == payload, f"stream {i} ({len(payload)} bytes): {str(answers.get(i))[:100]}"


def essentials(tmp_path, relay: Relay, agent_prefix: list[str]) -> None:
    service = PrivateService("drain-then-echo")
    try:
        customer = relay.create_customer("acme")
        token = relay.jwt("--customer-id", customer)
        agent = start_agent(tmp_path, "agent", relay, token, service.port, agent_prefix)
        relay.wait_available(customer, "db")
        addr = relay.endpoint(customer, "db")
        streams_both_ways(addr)
        # Reconnection: the relay dies and comes back on the same state and port.
        relay.proc.kill()
        relay.start()
        relay.wait_available(customer, "db")
        streams_both_ways(addr)
        assert agent.alive()
        # Graceful stop: the agent deregisters and exits 0.
        agent.signal(signal.SIGTERM)
        wait_until(lambda: not agent.alive(), 30, "the agent to stop")
        assert agent.proc.returncode == 0, agent.log()[-2000:]
        wait_until(lambda: relay.resource(customer, "db")["status"] == "UNAVAILABLE", 10, "the resource released")
        assert "Traceback" not in relay.proc.log() + agent.log()
    finally:
        service.close()


def test_previous_release_agent_against_this_relay(tmp_path, old_tree):
    version, tree = old_tree
    relay = Relay(tmp_path).start()
    try:
        essentials(tmp_path, relay, old_prefix(tree))
        assert f"version {version}" in relay.proc.log()  # the old agent said which it is
    finally:
        relay.stop()


def test_this_agent_against_previous_release_relay(tmp_path, old_tree):
    _, tree = old_tree
    relay = Relay(tmp_path, command_prefix=old_prefix(tree)).start()
    try:
        essentials(tmp_path, relay, [])
    finally:
        relay.stop()
