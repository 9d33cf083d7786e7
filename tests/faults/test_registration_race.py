"""Registration against ``--rotate`` and ``delete``, interleaved deterministically: the
relay's registration is held at its await point (binding a new resource's endpoint) by an
asyncio.Event while the admin API rotates or deletes the resource, then let go. No revoked
token gets in, no deleted resource is served or left bound, and nothing raises.

In process, with the relay's real state (SQLite), token authority, registry, endpoints and
admin API; only the agent's link is a stand-in that records what the relay sends. < 1 s."""

from __future__ import annotations

import asyncio
import json
import logging
import socket

import pytest

from relay.admin import AdminApi
from relay.registry import Registry
from relay.server import AgentLinkHandler, Relay
from relay.state import RelayState
from relay.tokens import TokenAuthority
from tunnel.carriers.base import Link
from tunnel.core.limits import Limits
from tunnel.wire.constants import ErrorCode

ADMIN_TOKEN = "admin-token-for-the-test"


class RecordingLink(Link):
    """What the relay sends to one agent, and whether it closed the link."""

    carrier = transport = "quic"  # no descriptor accounting for it
    peer_address = ("192.0.2.7", 40000)

    def __init__(self) -> None:
        self.sent: list[dict] = []
        self.closed: tuple | None = None

    def set_handler(self, handler) -> None:
        self.handler = handler

    def open_stream(self, metadata, handler):
        raise AssertionError("no stream expected")

    def send_control(self, message: dict) -> None:
        self.sent.append(message)

    def goaway(self, code=ErrorCode.NO_ERROR, reason="") -> None:
        pass

    def close(self, code=ErrorCode.NO_ERROR, reason="") -> None:
        if self.closed is None:
            self.closed = (code, reason)

    async def wait_closed(self) -> None:
        pass

    @property
    def is_closing(self) -> bool:
        return self.closed is not None


class HeldRegistry(Registry):
    """Holds each registration at its await point until the test lets it go."""

    def __init__(self, service_host: str) -> None:
        super().__init__(service_host)
        self.reached = asyncio.Event()
        self.proceed = asyncio.Event()

    async def ensure_endpoint(self, resource: dict):
        self.reached.set()
        await self.proceed.wait()
        return await super().ensure_endpoint(resource)


@pytest.fixture
def world(tmp_path):
    state = RelayState(tmp_path / "relay.db")
    authority = TokenAuthority(tmp_path)
    yield state, authority
    state.close()


def _admin(api: AdminApi, method: str, path: str, body: dict | None = None):
    return api.handle(method, path, {"authorization": f"Bearer {ADMIN_TOKEN}"},
                      json.dumps(body).encode() if body is not None else b"")


async def _race(state, authority, token: str, name: str, admin_step) -> tuple:
    registry = HeldRegistry("127.0.0.1")
    relay = Relay(state, authority, registry, Limits())
    api = AdminApi(state=state, authority=authority, registry=registry, token=ADMIN_TOKEN)
    link = RecordingLink()
    handler = AgentLinkHandler(relay, link)
    link.set_handler(handler)
    handler.control_received({"type": "auth", "token": token, "agent": {"version": "0.1.0"},
                              "resources": [{"name": name}]})
    await registry.reached.wait()  # step 1 done: token checked, resource created
    resource = state.find_resource(state.list_customers()[0]["id"], name)
    answer = admin_step(api, resource)  # between the steps
    registry.proceed.set()
    await asyncio.gather(*relay.tasks)
    return link, registry, resource, answer


def test_rotate_during_registration_keeps_the_revoked_token_out(world, caplog):
    state, authority = world
    customer = state.create_customer("acme")["id"]
    token = authority.issue(customer)
    caplog.set_level(logging.INFO)

    def rotate(api, resource):
        return _admin(api, "POST", "/v1/registration-jwt",
                      {"customer_id": customer, "resource_id": resource["id"], "rotate": True})

    link, registry, resource, answer = asyncio.run(_race(state, authority, token, "db", rotate))
    assert answer[0] == 200 and state.get_resource(resource["id"])["generation"] == 1
    assert [m["type"] for m in link.sent] == ["error"] and link.sent[0]["code"] == "revoked", link.sent
    assert link.closed[0] == ErrorCode.UNAUTHORIZED
    assert not registry.agents and registry.status(resource["id"]) == "UNAVAILABLE"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    registry.close()


def test_delete_during_registration_serves_nothing_and_raises_nothing(world, caplog):
    state, authority = world
    customer = state.create_customer("acme")["id"]
    token = authority.issue(customer)
    caplog.set_level(logging.INFO)

    def delete(api, resource):
        return _admin(api, "DELETE", f"/v1/resources/{resource['id']}")

    link, registry, resource, answer = asyncio.run(_race(state, authority, token, "db", delete))
    assert answer[0] == 200 and state.get_resource(resource["id"]) is None
    assert [m["type"] for m in link.sent] == ["error"] and link.sent[0]["code"] == "deleted", link.sent
    assert link.closed[0] == ErrorCode.UNAUTHORIZED
    assert not registry.agents and resource["id"] not in registry.endpoints
    with socket.socket() as s:  # the deleted resource's port is not left listening
        assert s.connect_ex(("127.0.0.1", resource["port"])) != 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    registry.close()
