"""Registration against ``--rotate`` and ``delete``, interleaved deterministically: the
relay's registration is held at an await point (binding a new resource's endpoint) by an
asyncio.Event while the admin API rotates or deletes the resource, then let go. No revoked
token gets in, no deleted resource is served or left bound, and nothing raises.

In process, with the relay's real state (SQLite), token authority, registry, endpoints,
cluster and admin API; only the agent's link is a stand-in that records what the relay sends.
(The same race from another relay, heard as a notification: tests/unit/relay/test_store.py.)
< 1 s."""

from __future__ import annotations

import asyncio
import json
import logging
import socket

from relay.control.admin import AdminApi
from relay.state.cluster import Cluster
from relay.data.registry import Registry
from relay.control.server import AgentLinkHandler, Relay
from relay.state.relay_state import RelayState
from relay.control.tokens import TokenAuthority
from tunnel.carriers.base import Link
from tunnel.core.limits import Limits
from tunnel.wire.constants import ErrorCode

ADMIN_TOKEN = "admin-token-for-the-test"


class RecordingLink(Link):
    """What the relay sends to one agent, and whether it closed the link."""

    carrier = "quic"  # no descriptor accounting for it
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


async def _admin(api: AdminApi, method: str, path: str, body: dict | None = None):
    return await api.handle(method, path, {"authorization": f"Bearer {ADMIN_TOKEN}"},
                            json.dumps(body).encode() if body is not None else b"")


async def _race(tmp_path, name: str, admin_step) -> tuple:
    """Register ``name`` with a customer-wide token, and run ``await admin_step(api, customer,
    resource)`` while the registration is held between its steps."""
    state = await RelayState.open(tmp_path)
    authority = TokenAuthority(tmp_path)
    customer = (await state.create_customer("acme"))["id"]
    token = authority.issue(customer)
    registry = HeldRegistry("127.0.0.1")
    cluster = Cluster(state, registry, "wss://127.0.0.1:8443")
    await cluster.start()
    try:
        relay = Relay(state, authority, registry, Limits(), cluster=cluster)
        api = AdminApi(state=state, authority=authority, registry=registry, token=ADMIN_TOKEN, cluster=cluster)
        link = RecordingLink()
        handler = AgentLinkHandler(relay, link)
        link.set_handler(handler)
        handler.control_received({"type": "auth", "token": token, "agent": {"version": "0.1.0"},
                                  "resources": [{"name": name}]})
        await registry.reached.wait()  # step 1 done: token checked, resource created
        resource = await state.find_resource(customer, name)
        answer = await admin_step(api, customer, resource)  # between the steps
        registry.proceed.set()
        await asyncio.gather(*relay.tasks)
        after = await state.get_resource(resource["id"])
        links = await state.list_links()
    finally:
        await cluster.stop()
        await state.close()
    return link, registry, resource, answer, after, links


def test_rotate_during_registration_keeps_the_revoked_token_out(tmp_path, caplog):
    caplog.set_level(logging.INFO)

    async def rotate(api, customer, resource):
        return await _admin(api, "POST", "/v1/registration-jwt",
                            {"customer_id": customer, "resource_id": resource["id"], "rotate": True})

    link, registry, resource, answer, after, links = asyncio.run(_race(tmp_path, "db", rotate))
    assert answer[0] == 200 and after["generation"] == 1 and links == []
    assert [m["type"] for m in link.sent] == ["error"] and link.sent[0]["code"] == "revoked", link.sent
    assert link.closed[0] == ErrorCode.UNAUTHORIZED
    assert not registry.agents and registry.status(resource["id"]) == "UNAVAILABLE"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    registry.close()


def test_delete_during_registration_serves_nothing_and_raises_nothing(tmp_path, caplog):
    caplog.set_level(logging.INFO)

    async def delete(api, customer, resource):
        return await _admin(api, "DELETE", f"/v1/resources/{resource['id']}")

    link, registry, resource, answer, after, links = asyncio.run(_race(tmp_path, "db", delete))
    assert answer[0] == 200 and after is None and links == []
    assert [m["type"] for m in link.sent] == ["error"] and link.sent[0]["code"] == "deleted", link.sent
    assert link.closed[0] == ErrorCode.UNAUTHORIZED
    assert not registry.agents and resource["id"] not in registry.endpoints
    with socket.socket() as s:  # the deleted resource's port is not left listening
        assert s.connect_ex(("127.0.0.1", resource["port"])) != 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    registry.close()
