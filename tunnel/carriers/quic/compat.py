"""Every use of aioquic's internals, in one place.

aioquic's ``QuicConnection`` is sans-IO and its public API covers connecting, streams, events
and timers. The carrier needs a few things more, and takes them here only:

- receive credit that follows consumption, never arrival (aioquic doubles MAX_DATA and
  MAX_STREAM_DATA as soon as half of a limit has *arrived*): :class:`BoundedConnection` hides
  the "arrived" counters from that check and moves the limits only when the link grants
  credit, by the rules of :mod:`tunnel.core.policy`;
- datagrams sized to the path after the handshake (the size lives in the connection, its
  pacer and its congestion controller) and the ``max_udp_payload_size`` transport parameter;
  above 16 KiB, STREAM frames with 4-byte lengths (aioquic always writes 2-byte ones, which
  cap a frame at 16383 bytes);
- a pacer that event-loop timers can keep up with and that prices packets at the standard
  datagram size (:class:`GranularPacer`);
- a stream sender that keeps written chunks instead of one growing ``bytearray``
  (:class:`ChunkSender`), and the offsets the peer acknowledged (progress, close flush);
- stream limits set at start (MAX_STREAMS), the connection's stream table;
- for :mod:`tunnel.carriers.quic.congestion`: the controller's pacing rate in the pacer (see
  :class:`GranularPacer`), and room on aioquic's ``QuicSentPacket`` (a dataclass without
  ``__slots__``) for the delivery state the controller keeps with each packet it is told of.

:data:`RELIED_ON` lists each internal attribute and method used here;
``tests/unit/test_quic_compat.py`` checks every one against the installed aioquic, so that an
upgrade that moves one fails there, loudly, instead of misbehaving somewhere in a link.
"""

from __future__ import annotations

import bisect

from aioquic.buffer import Buffer, size_uint_var
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE
from aioquic.quic.connection import TRANSPORT_CLOSE_FRAME_CAPACITY, QuicConnection
from aioquic.quic.crypto import CryptoPair
from aioquic.quic.packet import (
    QuicErrorCode,
    QuicFrameType,
    QuicPacketType,
    QuicStreamFrame,
    pull_quic_transport_parameters,
    push_quic_transport_parameters,
)
from aioquic.quic.packet_builder import QuicPacketBuilder
from aioquic.quic.recovery import QuicPacketPacer
from aioquic.quic.stream import QuicStream, QuicStreamSender

from tunnel.core.policy import overdraft_credit, session_credit, stream_credit
from tunnel.wire.constants import MAX_WINDOW

__all__ = [
    "RELIED_ON",
    "BoundedConnection",
    "ChunkSender",
    "GranularPacer",
    "acked_offset",
    "granted_offset",
    "attach",
    "attachment",
    "received_offset",
    "refuse_datagram",
    "sent_offset",
    "unacked",
    "unsent_bytes",
    "use_chunk_sender",
    "written_offset",
]

#: (class, attribute) pairs of aioquic internals this module uses: instance attributes are
#: checked on live objects, methods on the class.
RELIED_ON = [
    (QuicConnection, "_write_connection_limits"),
    (QuicConnection, "_write_stream_frame"),
    (QuicConnection, "_write_stream_limits"),
    (QuicConnection, "_serialize_transport_parameters"),
    (QuicConnection, "_parse_transport_parameters"),
    (QuicConnection, "_get_or_create_stream_for_send"),
    (QuicConnection, "_local_max_data"),
    (QuicConnection, "_local_max_streams_bidi"),
    (QuicConnection, "_local_max_streams_uni"),
    (QuicConnection, "_remote_max_data_used"),
    (QuicConnection, "_streams"),
    (QuicConnection, "_loss"),
    (QuicConnection, "_max_datagram_size"),
    ("loss", "_pacer"),
    ("loss", "_cc"),
    ("loss", "_pto_count"),
    ("cc", "on_packet_acked"),
    ("limit", "value"),
    ("limit", "used"),
    ("limit", "sent"),
    (QuicStream, "max_stream_data_local"),
    (QuicStream, "max_stream_data_local_sent"),
    (QuicStream, "max_stream_data_remote"),
    (QuicStream, "receiver"),
    (QuicStream, "sender"),
    ("receiver", "highest_offset"),
    (QuicStreamSender, "_buffer_start"),
    (QuicStreamSender, "_buffer_stop"),
    (QuicStreamSender, "_buffer_fin"),
    (QuicStreamSender, "_pending"),
    (QuicStreamSender, "_pending_eof"),
    (QuicStreamSender, "_reset_error_code"),
    (QuicStreamSender, "highest_offset"),
    (QuicStreamSender, "buffer_is_empty"),
    (QuicStreamSender, "on_data_delivery"),
    (QuicStreamSender, "get_frame"),
    (QuicStreamSender, "next_offset"),
    (QuicPacketPacer, "bucket_max"),
    (QuicPacketPacer, "update_rate"),
    (QuicPacketPacer, "_max_datagram_size"),
    (QuicPacketPacer, "packet_time"),
    (QuicPacketPacer, "bucket_time"),
    (QuicPacketPacer, "next_send_time"),
    (QuicPacketPacer, "update_bucket"),
    ("sent_packet", "__dict__"),
]

#: Burst the pacer allows, in seconds at the pacing rate: event-loop timers fire with about
#: a millisecond of slack (uvloop's resolution is 1 ms), so aioquic's 16-packet bucket alone
#: caps a stream at ~16 packets per timer tick whatever the path could carry.
PACING_BURST = 0.002
#: Attribute of aioquic's ``QuicStream`` where the link keeps its own state for the stream:
#: aioquic forgets a stream once both directions are done, and the state goes with it.
_ATTACHED = "tunnel_state"


class GranularPacer(QuicPacketPacer):
    """aioquic's pacer, at the congestion controller's pacing rate, with a burst of at least
    :data:`PACING_BURST` seconds, and each packet priced at its own size.

    aioquic derives the pacing rate from the window (``cwnd / srtt``): right for a window-based
    controller, wrong for a rate-based one, which keeps the window above the path's BDP on
    purpose and sets the rate itself. A controller with a ``pacing_rate`` (bytes per second,
    :class:`tunnel.carriers.quic.congestion.ModelCongestionControl`) is followed instead.

    aioquic charges every packet the time its *largest* datagram takes at the pacing rate,
    and knows no packet's size when it charges. Here a packet is charged at the handshake's
    standard size when it is built (:meth:`update_after_send`, aioquic's call), and the
    difference to its real size when it is handed to the controller (:meth:`charge`, called
    by the model controller's ``on_packet_sent``): a 64-byte request beside 64 KiB datagrams
    on loopback does not wait milliseconds for tokens, and a 1472-byte datagram on a WAN path
    is not sent 1.4 % faster than the rate.
    """

    def __init__(self, *, max_datagram_size: int, congestion=None) -> None:
        super().__init__(max_datagram_size=max_datagram_size)
        self._congestion = congestion
        self.pacing_rate = 0.0  # bytes per second in force

    def update_rate(self, congestion_window: int, smoothed_rtt: float) -> None:
        rate = getattr(self._congestion, "pacing_rate", None) or congestion_window / max(smoothed_rtt, 1e-6)
        size = self._max_datagram_size
        self.pacing_rate = rate
        self.packet_time = max(1e-6, min(size / rate, 1.0))
        # aioquic's bucket (a quarter window, 2 to 16 datagrams), at least PACING_BURST
        self.bucket_max = max(max(2 * size, min(congestion_window // 4, 16 * size)) / rate, PACING_BURST)
        self.bucket_time = min(self.bucket_time, self.bucket_max)

    def charge(self, size: int) -> None:
        """A packet of ``size`` bytes went out: charge what its nominal price missed (or
        refund what a small packet overpaid)."""
        if self.packet_time is not None and self.pacing_rate:
            self.bucket_time = min(self.bucket_time - (size - self._max_datagram_size) / self.pacing_rate,
                                   self.bucket_max)

    def next_send_time(self, now: float) -> float | None:
        if self.packet_time is not None:
            self.update_bucket(now=now)
            if self.bucket_time <= 0:
                return now + max(self.packet_time, -self.bucket_time)
        return None


class BoundedConnection(QuicConnection):
    """A ``QuicConnection`` that grants receive credit only when told to (see the module
    docstring); everything else (sending the limit frames, retransmitting them) stays
    aioquic's."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        cc = self._loss._cc
        self._loss._pacer = GranularPacer(max_datagram_size=self._max_datagram_size, congestion=cc)
        if hasattr(cc, "pacer"):
            cc.pacer = self._loss._pacer  # the model controller charges each packet's real size
        #: max_udp_payload_size we announce (None: aioquic's default, 65527).
        self.local_max_udp: int | None = None
        #: max_udp_payload_size the peer announced (None: not announced).
        self.peer_max_udp: int | None = None

    # --- state ------------------------------------------------------------------------

    def stream(self, stream_id: int) -> QuicStream | None:
        """aioquic's stream, or None once it forgot it (or never saw it)."""
        return self._streams.get(stream_id)

    def new_stream(self, stream_id: int) -> QuicStream:
        """Create a stream we open, with a :class:`ChunkSender`."""
        qs = self._get_or_create_stream_for_send(stream_id)
        qs.sender = ChunkSender(stream_id, True)
        return qs

    @property
    def remote_data_used(self) -> int:
        """Stream bytes handed to the wire so far, across all streams (aioquic's count
        against the peer's MAX_DATA)."""
        return self._remote_max_data_used

    @property
    def probe_timeouts(self) -> int:
        """Probe timeouts in a row without an acknowledgement."""
        return self._loss._pto_count

    def set_stream_limits(self, bidi: int, uni: int) -> None:
        """How many bidirectional and unidirectional streams the peer may open (aioquic adds
        one per stream the peer finished)."""
        for limit, value in ((self._local_max_streams_bidi, bidi), (self._local_max_streams_uni, uni)):
            limit.value = limit.sent = value

    # --- datagram size ----------------------------------------------------------------

    @property
    def datagram_size(self) -> int:
        """The largest UDP payload this side builds now."""
        return self._max_datagram_size

    def set_datagram_size(self, size: int) -> None:
        """Build datagrams of at most ``size`` bytes from now on (packets already sent keep
        theirs; lost ones are re-packed at the new size)."""
        self._max_datagram_size = size  # the pacer keeps its size: see GranularPacer
        cc = self._loss._cc
        if hasattr(cc, "_max_datagram_size"):
            cc._max_datagram_size = size
        if hasattr(cc, "additive_increase_factor"):
            cc.additive_increase_factor = size

    def watch_acks_above(self, size: int, callback) -> None:
        """Call ``callback()`` once a packet larger than ``size`` bytes is acknowledged
        (then stop watching, at no cost per ACK after)."""
        cc = self._loss._cc
        original = cc.on_packet_acked

        def on_packet_acked(*, packet, now) -> None:
            if packet.sent_bytes > size:
                self.stop_watching_acks()
                callback()
            original(packet=packet, now=now)

        cc.on_packet_acked = on_packet_acked

    def stop_watching_acks(self) -> None:
        cc = self._loss._cc
        if "on_packet_acked" in vars(cc):
            del cc.on_packet_acked  # back to the class's method

    def _serialize_transport_parameters(self) -> bytes:
        data = super()._serialize_transport_parameters()
        if self.local_max_udp is None:
            return data
        params = pull_quic_transport_parameters(Buffer(data=data))
        params.max_udp_payload_size = self.local_max_udp
        buf = Buffer(capacity=len(data) + 16)
        push_quic_transport_parameters(buf, params)
        return buf.data

    def _parse_transport_parameters(self, data: bytes, from_session_ticket: bool = False) -> None:
        super()._parse_transport_parameters(data, from_session_ticket)
        try:
            self.peer_max_udp = pull_quic_transport_parameters(Buffer(data=data)).max_udp_payload_size
        except Exception:  # aioquic accepted them; never fail on our second look
            self.peer_max_udp = None

    def _write_stream_frame(self, builder, space, stream, max_offset: int) -> int:
        if self._max_datagram_size <= 16384:
            return super()._write_stream_frame(builder=builder, space=space, stream=stream, max_offset=max_offset)
        # aioquic's method with a 4-byte length: frames up to the datagram size.
        sender = stream.sender
        overhead = 5 + size_uint_var(stream.stream_id) + (size_uint_var(sender.next_offset) if sender.next_offset else 0)
        previous = sender.highest_offset
        frame = sender.get_frame(builder.remaining_flight_space - overhead, max_offset)
        if frame is None:
            return 0
        frame_type = QuicFrameType.STREAM_BASE | 2 | (4 if frame.offset else 0) | (1 if frame.fin else 0)
        size = len(frame.data)
        buf = builder.start_frame(frame_type, capacity=overhead, handler=sender.on_data_delivery,
                                  handler_args=(frame.offset, frame.offset + size, frame.fin))
        buf.push_uint_var(stream.stream_id)
        if frame.offset:
            buf.push_uint_var(frame.offset)
        buf.push_uint32(size | 0x80000000)
        buf.push_bytes(frame.data)
        return sender.highest_offset - previous

    # --- receive credit ---------------------------------------------------------------

    def _write_connection_limits(self, builder, space) -> None:
        limit = self._local_max_data
        used, limit.used = limit.used, 0  # hidden: no doubling on arrival
        try:
            super()._write_connection_limits(builder=builder, space=space)
        finally:
            limit.used = used

    def _write_stream_limits(self, builder, space, stream) -> None:
        # Runs for every stream in every packet: return at once unless a grant is unsent.
        if stream.max_stream_data_local_sent == stream.max_stream_data_local:
            return
        receiver = stream.receiver
        highest, receiver.highest_offset = receiver.highest_offset, 0  # hidden, as above
        try:
            super()._write_stream_limits(builder=builder, space=space, stream=stream)
        finally:
            receiver.highest_offset = highest

    def grant_stream(self, stream: QuicStream, consumed: int, window: int) -> bool:
        """Credit for ``stream`` once the application consumed up to offset ``consumed``;
        True if MAX_STREAM_DATA moved (a packet should go out)."""
        credit = stream_credit(stream.max_stream_data_local, consumed, window)
        if credit:
            stream.max_stream_data_local += credit
            return True
        return False

    def grant_connection(self, consumed: int, window: int) -> bool:
        """Credit for the connection once ``consumed`` stream bytes (all streams) were
        consumed; True if MAX_DATA moved."""
        limit = self._local_max_data
        credit = session_credit(limit.value, limit.used, consumed, window)
        if credit:
            limit.value += credit
            return True
        return False


    def overdraft_due(self, consumed: int, window: int) -> bool:
        """Whether :meth:`grant_overdraft` would grant a stream with room enough."""
        limit = self._local_max_data
        return overdraft_credit(limit.value, limit.used, consumed, window, MAX_WINDOW) > 0

    def grant_overdraft(self, consumed: int, window: int, room: int) -> bool:
        """Connection credit beyond :meth:`grant_connection` for a stream that may still be
        sent ``room`` bytes while the peer holds (nearly) none (stalled streams hold it):
        :func:`tunnel.core.policy.overdraft_credit`. True if MAX_DATA moved."""
        limit = self._local_max_data
        credit = overdraft_credit(limit.value, limit.used, consumed, window, room)
        if credit:
            limit.value += credit
            return True
        return False


class ChunkSender(QuicStreamSender):
    """aioquic's stream sender keeping its buffer as the chunks written.

    The stock sender appends every write to one ``bytearray`` and deletes acknowledged bytes
    from its front; each time an append outgrows the allocation CPython copies the whole
    live buffer (up to a window of bytes), and every frame is copied twice (slice, then
    ``bytes``). Here a write keeps the caller's object (no copy), a frame is one slice, and
    acknowledged chunks are dropped. Behaviour (offsets, pending ranges, FIN, reset) is the
    stock class's; only the storage differs.
    """

    def __init__(self, stream_id: int | None, writable: bool) -> None:
        super().__init__(stream_id, writable)
        self._chunks: list = []  # bytes or memoryview, contiguous
        self._starts: list[int] = []  # stream offset of each chunk

    def write(self, data, end_stream: bool = False) -> None:
        if self._buffer_fin is not None:
            raise RuntimeError("Cannot send data after FIN")
        if self._reset_error_code is not None:
            raise RuntimeError("Cannot send data after the stream was reset")
        size = len(data)
        if size:
            self.buffer_is_empty = False
            stop = self._buffer_stop
            self._pending.add(stop, stop + size)
            self._chunks.append(data)
            self._starts.append(stop)
            self._buffer_stop = stop + size
        if end_stream:
            self.buffer_is_empty = False
            self._buffer_fin = self._buffer_stop
            self._pending_eof = True

    def _slice(self, start: int, stop: int) -> bytes:
        starts = self._starts
        chunks = self._chunks
        i = bisect.bisect_right(starts, start) - 1
        base = starts[i]
        chunk = chunks[i]
        if stop - base <= len(chunk):
            return bytes(chunk[start - base:stop - base])
        parts = []
        while start < stop:
            base = starts[i]
            chunk = chunks[i]
            end = min(stop, base + len(chunk))
            parts.append(chunk[start - base:end - base])
            start = end
            i += 1
        return b"".join(parts)

    def get_frame(self, max_size: int, max_offset: int | None = None):
        assert self._reset_error_code is None, "cannot call get_frame() after reset()"
        if max_size < 0:
            return None
        try:
            r = self._pending[0]
        except IndexError:
            if self._pending_eof:
                self._pending_eof = False
                return QuicStreamFrame(fin=True, offset=self._buffer_fin)
            self.buffer_is_empty = True
            return None
        start = r.start
        stop = min(r.stop, start + max_size)
        if max_offset is not None and stop > max_offset:
            stop = max_offset
        if stop <= start:
            return None
        frame = QuicStreamFrame(data=self._slice(start, stop), offset=start)
        self._pending.subtract(start, stop)
        if stop > self.highest_offset:
            self.highest_offset = stop
        if self._buffer_fin == stop:
            frame.fin = True
            self._pending_eof = False
        return frame

    def on_data_delivery(self, delivery, start: int, stop: int, fin: bool) -> None:
        previous = self._buffer_start
        super().on_data_delivery(delivery, start, stop, fin)
        acked = self._buffer_start
        if acked != previous:
            starts = self._starts
            chunks = self._chunks
            n = 0
            while n < len(chunks) and starts[n] + len(chunks[n]) <= acked:
                n += 1
            if n:
                del starts[:n], chunks[:n]


# --- stream offsets ---------------------------------------------------------------------


def use_chunk_sender(qs: QuicStream) -> None:
    """Give a stream the peer opened a :class:`ChunkSender` (before anything is written)."""
    if type(qs.sender) is QuicStreamSender and not qs.sender._buffer_stop:
        qs.sender = ChunkSender(qs.stream_id, True)


def granted_offset(qs: QuicStream) -> int:
    """Stream offset up to which we let the peer send (our MAX_STREAM_DATA)."""
    return qs.max_stream_data_local


def written_offset(qs: QuicStream) -> int:
    """Bytes handed to aioquic for the stream so far."""
    return qs.sender._buffer_stop


def sent_offset(qs: QuicStream) -> int:
    """Highest stream offset aioquic put on the wire."""
    return qs.sender.highest_offset


def acked_offset(qs: QuicStream) -> int:
    """Stream offset up to which the peer acknowledged our data."""
    return qs.sender._buffer_start


def unsent_bytes(qs: QuicStream) -> int:
    """Bytes handed to aioquic and never sent (nothing to send once the stream is reset)."""
    sender = qs.sender
    return max(0, sender._buffer_stop - sender.highest_offset)


def unacked(qs: QuicStream) -> bool:
    """True while bytes we sent on the stream wait for the peer's acknowledgement."""
    sender = qs.sender
    return sender._buffer_start < sender._buffer_stop and sender._reset_error_code is None


def received_offset(qs: QuicStream) -> int:
    """Highest stream offset received from the peer (delivered or buffered)."""
    return qs.receiver.highest_offset


def attach(qs: QuicStream, state) -> None:
    """Keep the link's state for a stream with aioquic's stream (see ``_ATTACHED``)."""
    setattr(qs, _ATTACHED, state)


def attachment(qs: QuicStream):
    """The state :func:`attach` kept (None if none)."""
    return getattr(qs, _ATTACHED, None)


# --- packets --------------------------------------------------------------------------


def refuse_datagram(version: int, source_cid: bytes, destination_cid: bytes) -> bytes:
    """A server Initial packet closing a connection attempt with CONNECTION_REFUSED."""
    crypto = CryptoPair()
    crypto.setup_initial(cid=source_cid, is_client=False, version=version)
    builder = QuicPacketBuilder(host_cid=source_cid, is_client=False, max_datagram_size=SMALLEST_MAX_DATAGRAM_SIZE,
                                peer_cid=destination_cid, version=version)
    builder.start_packet(QuicPacketType.INITIAL, crypto)
    buf = builder.start_frame(QuicFrameType.TRANSPORT_CLOSE, capacity=TRANSPORT_CLOSE_FRAME_CAPACITY)
    buf.push_uint_var(QuicErrorCode.CONNECTION_REFUSED)
    buf.push_uint_var(QuicFrameType.PADDING)
    buf.push_uint_var(0)
    datagrams, _ = builder.flush()
    return datagrams[0]
