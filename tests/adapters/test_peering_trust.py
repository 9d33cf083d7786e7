"""relay.peering, the dialling side: a relay forwards a worker's stream only to a peer whose
certificate names the role ``relay`` and that greets with the relay id the membership row
gave. The agent-facing server certificate (same CA, held by any TLS-terminating proxy in
front of a relay) gets no link and no forwarded traffic."""

from __future__ import annotations

from relay.state import pki
from relay.data.peering import Peering
from relay.data.registry import Registry
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
    def __init__(self, address: str) -> None:
        self.relay_id = HERE
        self.state = _State(address)
        self.members = [{"id": THERE}]

        class settings:
            member_ttl = 5.0

        self.settings = settings


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
