"""Fakes of the relay control-plane tests (imported by conftest.py and the test modules)."""

from __future__ import annotations


class FakeRegistry:
    """The data plane's registry as the admin API sees it (relay.admin.Registry)."""

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
