"""Fakes of the relay control-plane tests, and the runner of ``python -m relay`` commands
(imported by conftest.py and the test modules)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def run(args: list[str], *, env: dict | None = None, cwd: Path | None = None, secret: str | None = None):
    environment = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    environment["PYTHONPATH"] = str(REPO) + os.pathsep + environment.get("PYTHONPATH", "")
    environment.update(env or {})
    result = subprocess.run(
        [sys.executable, "-m", "relay", *args],
        capture_output=True,
        text=True,
        env=environment,
        cwd=cwd or REPO,
        timeout=120,
    )
    assert "Traceback" not in result.stderr, result.stderr
    if secret:
        assert secret not in result.stdout and secret not in result.stderr
    return result


def one_line_error(result, fragment: str) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tunnel-relay: error: ")
    assert fragment in lines[0], lines[0]


class FakeRegistry:
    """The data plane's registry as the admin API sees it (relay.control.admin.Registry)."""

    def __init__(self, service_host: str = "127.0.0.1") -> None:
        self.service_host = service_host
        #: Fake agents by resource id (the real registry's ``agents`` is a set of sessions;
        #: the cluster resynchronises only after a PostgreSQL outage, never in these tests).
        self.agents: dict[str, list[dict]] = {}
        self.endpoints: dict = {}
        self.dropped: list[tuple[str, int]] = []
        self.deleted: list[str] = []
        self.updated: list[tuple[str, str | None]] = []

    def agents_of(self, resource_id: str) -> list[dict]:
        return [{k: v for k, v in a.items() if k != "generation"} for a in self.agents.get(resource_id, [])]

    def drop_agents(self, resource_id: str, below_generation: int) -> int:
        self.dropped.append((resource_id, below_generation))
        before = self.agents.get(resource_id, [])
        kept = [a for a in before if a.get("generation", 0) >= below_generation]
        self.agents[resource_id] = kept
        return len(before) - len(kept)

    def resource_updated(self, resource_id: str, allow_cidrs: str | None) -> None:
        self.updated.append((resource_id, allow_cidrs))

    def resource_deleted(self, resource_id: str) -> None:
        self.deleted.append(resource_id)
        self.agents.pop(resource_id, None)


def fake_agent(agent_id: str = "agt_1", generation: int = 0, **extra) -> dict:
    agent = {
        "agent_id": agent_id,
        "transport": "wss",
        "address": "192.0.2.10:50000",
        "version": "0.1.0",
        "hostname": "db-host",
        "connected_since": "2025-01-01T00:00:00Z",
        "bytes_sent": 10,
        "bytes_received": 20,
        "active_streams": 1,
        "generation": generation,
    }
    agent.update(extra)
    return agent
