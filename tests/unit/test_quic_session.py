"""The sans-IO QUIC mapping (tunnel/core/quic_session.py, docs/PROTOCOL.md "QUIC mapping").

Two :class:`QuicSession` objects over real aioquic connections, wired by hand with a fake
clock: no sockets, no event loop. Each side's frames go into a core
:class:`tunnel.core.session.Session` of its role and that session's output back into the
QUIC session, as the link does (tunnel/carriers/quic/link.py). Datagrams move only when a
test moves them, so that a test can hold some back, reorder them, or write raw QUIC frames
through the connection underneath (``QuicSession.connection``) as a foreign or hostile peer.
"""

from __future__ import annotations

import ssl
from collections import defaultdict

import pytest
from aioquic.buffer import Buffer
from aioquic.quic.packet import pull_quic_header

from tests.helpers import make_pki
from tunnel import codec as frames
from tunnel.carriers.quic.config import configuration, new_session
from tunnel.core import quic_session as qs
from tunnel.core.events import (
    ConnectionClosed,
    DataReceived,
    GoAwayReceived,
    SessionReady,
    StreamEnded,
    StreamOpened,
    StreamReset,
)
from tunnel.core.limits import Limits
from tunnel.core.quic_session import QuicClosed
from tunnel.core.session import Session
from tunnel.core.session_state import Role
from tunnel.wire.constants import HEADER_SIZE, ErrorCode, Flags, FrameType

KiB = 1024
CLIENT_ADDR = ("10.0.0.1", 40000)
SERVER_ADDR = ("10.0.0.2", 443)
#: Small windows, so that a few hundred KiB cross every limit; metadata up to 4 KiB.
LIMITS = Limits(max_frame_size=16 * KiB, initial_stream_window=64 * KiB, max_stream_window=64 * KiB,
                session_window=128 * KiB, max_concurrent_streams=16)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("quic-session-pki"))


class Side:
    """One end: a QuicSession, the core Session it feeds, and what that core reported. The
    application consumes what arrives at once unless ``consume`` is False."""

    def __init__(self, quic: qs.QuicSession, role: Role, limits: Limits, now: float) -> None:
        self.quic = quic
        self.core = Session(role, limits, now)
        self.consume = True
        self.events: list = []
        self.data: dict[int, bytearray] = defaultdict(bytearray)
        self.quic_events: list = []

    @property
    def conn(self):
        return self.quic.connection

    def to_quic(self) -> None:
        buffers = self.core.data_to_send()
        if buffers:
            self.quic.send_frames(buffers)

    def to_core(self, now: float) -> None:
        discarded = self.quic.pop_discarded()
        if discarded:
            self.core.credit_discarded(discarded)
        data = self.quic.pop_frames()
        if data:
            self.core.receive_data(data, now)
        self.quic_events += self.quic.pop_events()
        for event in self.core.pop_events():
            if isinstance(event, DataReceived):
                self.data[event.stream_id] += event.data
                if self.consume:
                    self.core.consume(event.stream_id, len(event.data))
                event = DataReceived(event.stream_id, b"")
            self.events.append(event)

    def of(self, kind) -> list:
        return [e for e in self.events if isinstance(e, kind)]

    def closed(self) -> ConnectionClosed | None:
        found = self.of(ConnectionClosed)
        return found[0] if found else None

    def quic_closed(self) -> QuicClosed | None:
        found = [e for e in self.quic_events if isinstance(e, QuicClosed)]
        return found[0] if found else None


class Pair:
    """An agent (QUIC client) and a relay (QUIC server) on a fake clock."""

    def __init__(self, pki, limits: Limits = LIMITS, server_limits: Limits | None = None,
                 datagram_size: int = 1452) -> None:
        server_limits = server_limits or limits
        self.now = 1000.0
        config = configuration(limits, is_client=True)
        config.server_name = "localhost"
        config.load_verify_locations(cafile=str(pki.ca_file))
        config.verify_mode = ssl.CERT_REQUIRED
        self.agent = Side(new_session(config, limits, datagram_size=datagram_size), Role.AGENT, limits, self.now)
        self.agent.quic.connect(SERVER_ADDR, self.now)
        first = self.agent.quic.datagrams_to_send(self.now)
        server_config = configuration(server_limits, is_client=False)
        server_config.load_cert_chain(str(pki.cert_file), str(pki.key_file))
        header = pull_quic_header(Buffer(data=first[0][0]), host_cid_length=server_config.connection_id_length)
        self.relay = Side(new_session(server_config, server_limits, datagram_size=datagram_size,
                                      original_destination_connection_id=header.destination_cid),
                          Role.RELAY, server_limits, self.now)
        self.into(self.relay, [d for d, _ in first])
        assert self.run(lambda: self.agent.of(SessionReady) and self.relay.of(SessionReady))

    def peer(self, side: Side) -> Side:
        return self.relay if side is self.agent else self.agent

    def out(self, side: Side) -> list[bytes]:
        """What ``side`` sends now (its core's frames first go to QUIC)."""
        side.to_quic()
        datagrams = [bytes(d) for d, _ in side.quic.datagrams_to_send(self.now)]
        side.to_core(self.now)  # a connection that closed itself says so while sending
        return datagrams

    def into(self, side: Side, datagrams) -> None:
        addr = SERVER_ADDR if side is self.agent else CLIENT_ADDR
        for data in datagrams:
            side.quic.receive_datagram(data, addr, self.now)
        side.to_core(self.now)

    def step(self) -> bool:
        """Move what each side sends now to the other; True if anything moved."""
        moved = False
        for side in (self.agent, self.relay):
            datagrams = self.out(side)
            if datagrams:
                moved = True
                self.into(self.peer(side), datagrams)
        return moved

    def run(self, condition=lambda: False, limit: float = 2.0, steps: int = 20000) -> bool:
        """Move datagrams, and the clock to the next timer when nothing moves, until
        ``condition()`` holds or ``limit`` fake seconds passed (or nothing is left to do)."""
        end = self.now + limit
        for _ in range(steps):
            if condition():
                return True
            if self.step():
                continue
            timers = [t for t in (self.agent.quic.next_timer(self.now), self.relay.quic.next_timer(self.now))
                      if t is not None]
            if not timers or min(timers) > end:
                break
            self.now = max(self.now, min(timers))
            for side in (self.agent, self.relay):
                at = side.quic.next_timer(self.now)
                if at is not None and at <= self.now:
                    side.quic.handle_timer(self.now)
                    side.to_core(self.now)
        return bool(condition())

    def settle(self, limit: float = 0.5) -> None:
        """Run until quiet: every datagram and ACK delivered."""
        self.run(limit=limit)


def pattern(seed: int, size: int) -> bytes:
    return bytes((seed * 7 + i * 13) & 0xFF for i in range(size))


def assert_link_closed(pair: Pair, side: Side, code: int = ErrorCode.PROTOCOL_ERROR) -> None:
    """``side`` closed the connection with ``code``, and the peer heard so."""
    peer = pair.peer(side)
    pair.run(lambda: peer.quic_closed() is not None)
    assert side.quic.closed
    closed = peer.quic_closed()
    assert closed is not None and closed.code == code, closed


# --- the happy paths ----------------------------------------------------------------------


def test_hello_exchange_and_a_stream_each_way_with_fin(pki):
    pair = Pair(pki)
    assert pair.agent.core.version == pair.relay.core.version == 1
    up, down = pattern(1, 100 * KiB), pattern(2, 90 * KiB)
    sid = pair.relay.core.open_stream(b"db")
    pair.relay.core.send_data(sid, down, end_stream=True)
    aid = pair.agent.core.open_stream(b"up")
    pair.agent.core.send_data(aid, up, end_stream=True)
    assert pair.run(lambda: len(pair.agent.of(StreamEnded)) == 1 and len(pair.relay.of(StreamEnded)) == 1)
    (opened,) = pair.agent.of(StreamOpened)
    assert (opened.stream_id, opened.metadata) == (sid, b"db") and sid % 2 == 0
    (opened,) = pair.relay.of(StreamOpened)
    assert (opened.stream_id, opened.metadata) == (aid, b"up") and aid % 2 == 1
    assert bytes(pair.agent.data[sid]) == down and bytes(pair.relay.data[aid]) == up
    # The other directions still flow after each FIN, then end too.
    pair.agent.core.send_data(sid, b"answer", end_stream=True)
    pair.relay.core.send_data(aid, b"reply", end_stream=True)
    assert pair.run(lambda: len(pair.agent.of(StreamEnded)) == 2 and len(pair.relay.of(StreamEnded)) == 2)
    assert bytes(pair.relay.data[sid]) == b"answer" and bytes(pair.agent.data[aid]) == b"reply"
    pair.settle()
    assert not pair.agent.quic._routes and not pair.relay.quic._routes
    assert not pair.agent.of(StreamReset) and not pair.relay.of(StreamReset)
    assert pair.agent.closed() is None and pair.relay.closed() is None
