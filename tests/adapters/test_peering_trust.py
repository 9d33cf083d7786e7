"""relay.data.peering: a relay forwards a worker's stream only to a peer whose certificate names the
role ``relay`` and that greets with the relay id the membership row gave; the agent-facing
server certificate (same CA, held by any TLS-terminating proxy in front of a relay) gets no
link and no forwarded traffic. The listening side answers only a live relay of the membership
table."""

from __future__ import annotations

import asyncio

from relay.data.peering import Peering
from relay.data.registry import Registry
from relay.state import pki
from tunnel.bridge.dial import dial_tls_link
from tunnel.bridge.listen import serve_tls_links
from tunnel.carriers.base import LinkHandler, StreamHandler
from tunnel.core.limits import DEFAULT_LIMITS

HERE = "rly_aaaaaaaaaaaaaaaa"
THERE = "rly_bbbbbbbbbbbbbbbb"


class _State:
    def __init__(self, address: str) -> None:
        self.address = address

    async def holders(self, resource_id, ttl):
        return [{"relay_id": THERE, "peer_address": self.address, "draining": False, "epoch": 1}]


class _Cluster:
    def __init__(self, address: str = "") -> None:
        self.relay_id = HERE
        self.state = _State(address)
        self.asked: list[str] = []
        self.members: list[dict] = []
        self.unreachable: set[str] = set()

        class settings:
            member_ttl = 5.0

        self.settings = settings

    async def is_member(self, relay_id: str) -> bool:
        self.asked.append(relay_id)
        return relay_id == THERE


class _FakePeer(LinkHandler):
    """Answers the greeting as the relay ``greet_as`` and counts the streams it is sent."""

    def __init__(self, link, seen: dict, greet_as: str) -> None:
        self.link = link
        self.seen = seen
        self.greet_as = greet_as

    def control_received(self, message: dict) -> None:
        self.seen.setdefault("greetings", []).append(message)
        self.link.send_control({"type": "peer", "relay_id": self.greet_as})
        self.link.handshake_done()

    def stream_opened(self, stream):
        self.seen.setdefault("streams", []).append(bytes(stream.metadata))
        return None

    def link_closed(self, code: int, reason: str) -> None:
        self.seen["closed"] = reason


class _Worker(StreamHandler):
    def data_received(self, data):
        pass


async def _forward_to_fake(state_dir, cert_file: str, key_file: str, greet_as: str = THERE) -> tuple[bool, dict]:
    keys = pki.ensure_pki(state_dir)
    peer_cert, peer_key = pki.ensure_peer_cert(state_dir, ["127.0.0.1"])
    seen: dict = {}
    server = await serve_tls_links("127.0.0.1", 0, ssl_context=pki.server_ssl_context(cert_file, key_file),
                                   limits=DEFAULT_LIMITS,
                                   on_link=lambda link: link.set_handler(_FakePeer(link, seen, greet_as)))
    address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    peering = Peering(_Cluster(address), Registry("127.0.0.1"), DEFAULT_LIMITS, server_context=None,
                      client_context=pki.peer_client_ssl_context(peer_cert, peer_key, keys.ca_file))
    try:
        opened = await peering.open_forward("res_x", _Worker())
        return opened is not None, seen
    finally:
        peering.close()
        server.close()


def test_a_peer_with_the_relay_certificate_gets_the_stream(run, tmp_path):
    """The control case: the same fake, presenting a relay-to-relay certificate, is sent it."""
    pki.ensure_pki(tmp_path)
    cert, key = pki.ensure_peer_cert(tmp_path, ["127.0.0.1"])
    opened, seen = run(_forward_to_fake(tmp_path, cert, key))
    assert opened and seen["greetings"][0]["relay_id"] == HERE


def test_a_peer_presenting_the_server_certificate_gets_no_forwarded_traffic(run, tmp_path):
    keys = pki.ensure_pki(tmp_path)
    opened, seen = run(_forward_to_fake(tmp_path, keys.cert_file, keys.key_file))
    assert not opened
    assert "streams" not in seen and "greetings" not in seen  # not even told who dialled


def test_a_peer_greeting_with_another_relay_id_gets_no_forwarded_traffic(run, tmp_path):
    pki.ensure_pki(tmp_path)
    cert, key = pki.ensure_peer_cert(tmp_path, ["127.0.0.1"])
    opened, seen = run(_forward_to_fake(tmp_path, cert, key, greet_as="rly_cccccccccccccccc"))
    assert not opened and "streams" not in seen


class _Dialler(LinkHandler):
    def __init__(self, seen: dict) -> None:
        self.seen = seen

    def control_received(self, message: dict) -> None:
        self.seen.setdefault("answers", []).append(message)

    def stream_opened(self, stream):
        return None

    def link_closed(self, code: int, reason: str) -> None:
        self.seen["closed"] = reason


async def _greet_listener(state_dir, greet_as: str) -> tuple[dict, list[str]]:
    keys = pki.ensure_pki(state_dir)
    cert, key = pki.ensure_peer_cert(state_dir, ["127.0.0.1"])
    cluster = _Cluster()
    peering = Peering(cluster, Registry("127.0.0.1"), DEFAULT_LIMITS,
                      server_context=pki.peer_server_ssl_context(cert, key, keys.ca_file), client_context=None)
    port = await peering.listen("127.0.0.1", 0)
    seen: dict = {}
    link = await dial_tls_link(f"127.0.0.1:{port}", ssl_context=pki.peer_client_ssl_context(cert, key, keys.ca_file),
                               limits=DEFAULT_LIMITS, timeout=10)
    try:
        link.set_handler(_Dialler(seen))
        link.send_control({"type": "peer", "relay_id": greet_as})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while "answers" not in seen and "closed" not in seen:
            assert loop.time() < deadline, "no answer and no close"
            await asyncio.sleep(0.02)
        return seen, cluster.asked
    finally:
        link.close()
        peering.close()


def test_the_listener_answers_a_relay_of_the_membership_table(run, tmp_path):
    seen, asked = run(_greet_listener(tmp_path, THERE))
    assert seen["answers"] == [{"type": "peer", "relay_id": HERE, "features": ["worker_address"]}] and asked == [THERE]


def test_the_listener_closes_a_link_greeting_as_no_relay_of_the_cluster(run, tmp_path):
    seen, asked = run(_greet_listener(tmp_path, "rly_cccccccccccccccc"))
    assert "answers" not in seen and "not a relay of the cluster" in seen["closed"]
