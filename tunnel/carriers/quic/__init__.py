"""The QUIC carrier: a :class:`tunnel.carriers.base.Link` over aioquic's sans-IO ``QuicConnection``.

Mapping (docs/PROTOCOL.md, "QUIC mapping"):

- the agent's first bidirectional stream (QUIC stream 0) is the control stream and carries
  our frames (HELLO, CONTROL, PING/ACK, GOAWAY) in the codec's format;
- every tunneled stream is its own bidirectional QUIC stream opened by the side calling
  :meth:`QuicLink.open_stream`; its first bytes are one OPEN frame (stream ID field 0, payload
  the metadata), then raw bytes; QUIC FIN is the half-close; ``LinkStream.reset(code)`` is
  RESET_STREAM + STOP_SENDING carrying our error code.

Bounded memory, both ways:

- *Receive credit follows consumption.* :class:`_BoundedConnection` subclasses
  ``QuicConnection`` and disables aioquic's "double the limit once half of it has *arrived*"
  policy; the limits start at ``initial_stream_window`` / ``session_window`` (transport
  parameters) and are raised only by :meth:`_QuicLinkStream.consume`: once less than half a
  window of credit is left, MAX_STREAM_DATA (and MAX_DATA) go to ``consumed + window``.
  Bytes the application never sees (OPEN headers, control-stream frames, data for a stream
  already reset) are consumed by the carrier itself; a closing stream gives its unconsumed
  bytes back to the connection budget.
- *Sends are bounded.* ``write`` queues in our own per-stream deque (``paused`` above
  ``stream_send_high_water``, ``writable()`` below ``stream_send_low_water``). The carrier
  hands aioquic at most what the peer's stream credit allows, and never more than
  ``_UNSENT_CHUNK`` bytes beyond what aioquic already put on the wire, so aioquic's send
  buffer holds at most the peer's window (in flight, unacknowledged) plus one chunk.

  As on WSS, once the link's queues together exceed ``session_send_high_water`` every
  writer is paused (even one with a short queue) until they drain below it.
  Across the link, bytes handed to aioquic but not yet sent stay below ``_LINK_UNSENT``
  (what is sent and unacknowledged is bounded by the peer's session window), so many
  streams cannot pile a chunk each into aioquic. Data streams use :class:`_ChunkSender`
  (aioquic's sender with the buffer kept as the written chunks: no whole-buffer copies).

Limits shared with the WSS session (tunnel/core/limits.py), checked in one place each:
``max_concurrent_streams`` (peer streams beyond it are reset with STREAM_LIMIT; aioquic's
MAX_STREAMS is set a little above it so that our answer is a prompt reset, not a silent
wait), ``max_ping_rate`` and ``max_stream_churn_rate`` (per one-second window; the link
closes with ENHANCE_YOUR_CALM), ``half_close_timeout`` (a half-closed stream without data in
or out, consumption, or acknowledgement of our data for that long is reset with TIMEOUT).

``close`` sends what is queued on the control stream first (a CONTROL error message, the
GOAWAY): CONNECTION_CLOSE follows once the peer acknowledged it, or after
``CLOSE_FLUSH_TIMEOUT``. The application sees the link closed at once either way.

Datagram size: the handshake runs at 1452 bytes (less if the route is narrower). After it,
the link moves to the path's size: the client reads the route MTU of its connected socket
(``IP_MTU``/``IPV6_MTU``, DF set with ``IP_PMTUDISC_DO`` so oversize sends fail loudly) and
announces the result as ``max_udp_payload_size``; the server looks up its own route to the
peer and never exceeds what the peer announced (a peer announcing nothing gets 1452). The
cap is ``MAX_PATH_DATAGRAM_SIZE`` (16384: aioquic's 2-byte STREAM frame lengths). An
``EMSGSIZE`` on send, or two probe timeouts in a row before any large packet was
acknowledged (a black hole), drops the link back to 1452. ``TUNNEL_QUIC_MAX_DATAGRAM_SIZE``
overrides the path size. Figures: bench/QUIC.md.

The I/O adapter is ours (not ``aioquic.asyncio``): a client owns a connected UDP socket; a
server (:class:`QuicServer`) owns one UDP socket and demultiplexes connections by connection
ID (short-header packets by slicing it, without a header parse), with a handshake deadline,
a cap on handshakes in progress (a stale one is evicted for a newcomer, as over WSS: see
:mod:`tunnel.carriers.handshakes`) and a cap on connections. Once half the handshake slots are taken,
new clients must prove their address with a Retry round trip first (RFC 9000 section 8.1), so
a flood of Initial packets from spoofed addresses cannot hold slots at all.

Sends are coalesced: one ``call_soon`` per loop iteration runs ``datagrams_to_send`` and
writes every datagram in a tight loop, straight to the socket (GSO batches of equal-sized
datagrams on Linux), through the transport only while the socket is full.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import errno
import ipaddress
import logging
import os
import socket
import ssl
import struct
import sys
from collections.abc import Callable

from aioquic.buffer import Buffer
from aioquic.quic import events as qe
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE, QuicConfiguration
from aioquic.quic.connection import (
    TRANSPORT_CLOSE_FRAME_CAPACITY,
    QuicConnection,
    QuicConnectionState,
)
from aioquic.quic.crypto import CryptoPair
from aioquic.quic.packet import (
    QuicErrorCode,
    QuicFrameType,
    QuicPacketType,
    QuicStreamFrame,
    encode_quic_retry,
    encode_quic_version_negotiation,
    pull_quic_header,
    pull_quic_transport_parameters,
    push_quic_transport_parameters,
)
from aioquic.quic.packet_builder import QuicPacketBuilder
from aioquic.quic.recovery import QuicPacketPacer
from aioquic.quic.retry import QuicRetryTokenHandler
from aioquic.quic.stream import QuicStreamSender

from tunnel import codec as frames
from tunnel.carriers.base import Link, LinkHandler, LinkStream, StreamHandler
from tunnel.carriers.handshakes import PendingHandshakes
from tunnel.core.limits import Limits
from tunnel.core.rates import PerSecond
from tunnel.wire.constants import (
    HEADER_SIZE,
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    QUIC_ALPN,
    ErrorCode,
    Flags,
    FrameType,
)
from tunnel.wire.control import decode_control, encode_control
from tunnel.wire.errors import FloodError, LinkError, ProtocolError, SessionClosed, StreamClosed

__all__ = ["QuicLink", "QuicServer", "connect_quic", "serve_quic"]

log = logging.getLogger(__name__)

CONTROL_STREAM_ID = 0
#: Most bytes handed to aioquic beyond what it has already sent on a stream.
_UNSENT_CHUNK = 256 * 1024
#: UDP payload size of the handshake, and of every link whose path is not known to carry more:
#: fits a 1500-byte MTU path with IPv6 + UDP headers.
MAX_DATAGRAM_SIZE = 1452
#: Largest UDP payload a link uses after its handshake, when the route MTU allows it
#: (loopback, jumbo-frame LANs): the carrier's cost is per packet, so throughput scales
#: almost with the size. aioquic writes STREAM frame lengths as 2-byte varints (< 16384), so
#: larger datagrams would corrupt frames.
MAX_PATH_DATAGRAM_SIZE = 16384
#: Environment override of the post-handshake datagram size (clamped to [1200, 16384]).
DATAGRAM_SIZE_ENV = "TUNNEL_QUIC_MAX_DATAGRAM_SIZE"
#: Flush bound for control frames queued before ``close`` (seconds).
CLOSE_FLUSH_TIMEOUT = 1.0
#: Most bytes handed to aioquic but not yet sent, across every stream of a link.
_LINK_UNSENT = 1024 * 1024
# Linux socket options the socket module does not name.
_IP_MTU_DISCOVER, _IP_PMTUDISC_DO, _IP_MTU = 10, 2, 14
_IPV6_MTU_DISCOVER, _IPV6_PMTUDISC_DO, _IPV6_MTU = 23, 2, 24
#: Socket buffers; the kernel caps them at net.core.[rw]mem_max.
SOCKET_BUFFER = 8 * 1024 * 1024
#: Largest OPEN metadata (resource name) accepted on a tunneled stream.
MAX_METADATA = 4096
#: Default cap on connections one :class:`QuicServer` holds.
DEFAULT_MAX_CONNECTIONS = 10000
_HEADER = struct.Struct("!BBHII")
_OPEN = int(FrameType.OPEN)


#: Burst the pacer allows, in seconds at the pacing rate: event-loop timers fire with about
#: a millisecond of slack (uvloop's resolution is 1 ms), so aioquic's 16-packet bucket alone
#: caps a stream at ~16 packets per timer tick whatever the path could carry.
PACING_BURST = 0.002


class _GranularPacer(QuicPacketPacer):
    def update_rate(self, congestion_window: int, smoothed_rtt: float) -> None:
        super().update_rate(congestion_window, smoothed_rtt)
        if self.bucket_max < PACING_BURST:
            self.bucket_max = PACING_BURST


class _BoundedConnection(QuicConnection):
    """A ``QuicConnection`` that grants receive credit only when told to.

    aioquic raises MAX_STREAM_DATA / MAX_DATA (doubling them) as soon as half of the current
    limit has *arrived*. The two overrides below hide the "arrived" counters from that check
    while the frames are written, so the limits only move when :meth:`grant_stream` /
    :meth:`grant_connection` move them; everything else (sending the frame, retransmitting
    it when lost) stays aioquic's.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._loss._pacer = _GranularPacer(max_datagram_size=self._max_datagram_size)
        #: max_udp_payload_size we announce (None: the default, 65527).
        self.tn_local_max_udp: int | None = None
        #: max_udp_payload_size the peer announced (None: not announced).
        self.tn_peer_max_udp: int | None = None

    def set_datagram_size(self, size: int) -> None:
        """Build datagrams of at most ``size`` bytes from now on (packets already sent keep
        theirs; lost ones are re-packed at the new size)."""
        self._max_datagram_size = size
        self._loss._pacer._max_datagram_size = size
        cc = self._loss._cc
        if hasattr(cc, "_max_datagram_size"):
            cc._max_datagram_size = size
        if hasattr(cc, "additive_increase_factor"):
            cc.additive_increase_factor = size

    def _serialize_transport_parameters(self) -> bytes:
        data = super()._serialize_transport_parameters()
        if self.tn_local_max_udp is None:
            return data
        params = pull_quic_transport_parameters(Buffer(data=data))
        params.max_udp_payload_size = self.tn_local_max_udp
        buf = Buffer(capacity=len(data) + 16)
        push_quic_transport_parameters(buf, params)
        return buf.data

    def _parse_transport_parameters(self, data: bytes, from_session_ticket: bool = False) -> None:
        super()._parse_transport_parameters(data, from_session_ticket)
        try:
            self.tn_peer_max_udp = pull_quic_transport_parameters(Buffer(data=data)).max_udp_payload_size
        except Exception:  # aioquic accepted them; never fail on our second look
            self.tn_peer_max_udp = None

    def _write_connection_limits(self, builder, space) -> None:
        limit = self._local_max_data
        used, limit.used = limit.used, 0
        try:
            super()._write_connection_limits(builder=builder, space=space)
        finally:
            limit.used = used

    def _write_stream_limits(self, builder, space, stream) -> None:
        # Runs for every stream in every packet: return at once unless a grant is unsent.
        if stream.max_stream_data_local_sent == stream.max_stream_data_local:
            return
        receiver = stream.receiver
        highest, receiver.highest_offset = receiver.highest_offset, 0
        try:
            super()._write_stream_limits(builder=builder, space=space, stream=stream)
        finally:
            receiver.highest_offset = highest

    def grant_stream(self, stream, consumed: int, window: int) -> bool:
        """Credit for ``stream`` once the application consumed up to offset ``consumed``."""
        if stream.max_stream_data_local - consumed <= window // 2:
            stream.max_stream_data_local = consumed + window
            return True
        return False

    def grant_connection(self, consumed: int, window: int) -> bool:
        limit = self._local_max_data
        if limit.value - consumed <= window // 2:
            limit.value = consumed + window
            return True
        return False


class _ChunkSender(QuicStreamSender):
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


def _refuse_datagram(version: int, source_cid: bytes, destination_cid: bytes) -> bytes:
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


def _configuration(limits: Limits, *, is_client: bool) -> QuicConfiguration:
    override = _env_datagram_size()
    return QuicConfiguration(
        alpn_protocols=[QUIC_ALPN],
        is_client=is_client,
        idle_timeout=limits.keepalive_timeout,
        max_data=limits.session_window,
        max_stream_data=limits.initial_stream_window,
        # The handshake uses the standard size; _apply_datagram_size raises it afterwards.
        max_datagram_size=min(MAX_DATAGRAM_SIZE, override or MAX_DATAGRAM_SIZE),
        congestion_control_algorithm="cubic",
        verify_mode=ssl.CERT_REQUIRED,
    )


def _udp_socket(family: int, *, bind=None, connect=None) -> socket.socket:
    """A non-blocking UDP socket with large buffers (we keep it to send with GSO)."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        _tune_socket(sock)
        if bind is not None:
            sock.bind(bind)
        if connect is not None:
            sock.connect(connect)
    except BaseException:
        sock.close()
        raise
    return sock


_UDP_SEGMENT = 103  # linux/udp.h
_GSO_MAX_SEGMENTS = 64
_GSO_MAX_BYTES = 65000


class _UdpSender:
    """Writes a batch of datagrams straight to the socket: runs of equal-sized datagrams to
    one address go out in one ``sendmsg`` with UDP generic segmentation offload (Linux).
    Falls back to the transport (which buffers) when the socket is full, and keeps using it
    while it holds anything, so datagrams leave in order."""

    __slots__ = ("transport", "sock", "connected", "gso", "on_error")

    def __init__(self, transport, sock: socket.socket | None, connected: bool, on_error=None) -> None:
        self.transport = transport
        self.sock = sock
        self.connected = connected
        self.on_error = on_error  # error_received(exc) of the protocol, for errors we catch
        self.gso = sock is not None and hasattr(socket, "SOL_UDP") and os.environ.get(
            "TUNNEL_QUIC_GSO", "1") not in ("0", "")
        if not sys.platform.startswith("linux"):
            self.gso = False

    def send(self, datagrams) -> bool:
        """Send ``[(data, addr), ...]``; return True if the kernel refused one as larger than
        the path MTU (EMSGSIZE, DF set): it is dropped, QUIC's loss recovery resends its
        frames, and the caller should shrink its datagrams."""
        transport = self.transport
        if transport.is_closing():
            return False
        sock = self.sock
        connected = self.connected
        too_big = False
        n = len(datagrams)
        i = 0
        while i < n:
            data, addr = datagrams[i]
            j = i + 1
            if self.gso:
                size = len(data)
                total = size
                while j < n and j - i < _GSO_MAX_SEGMENTS:
                    nxt, naddr = datagrams[j]
                    nsize = len(nxt)
                    if naddr != addr or nsize > size or total + nsize > _GSO_MAX_BYTES:
                        break
                    total += nsize
                    j += 1
                    if nsize < size:
                        break
            if sock is not None and not transport.get_write_buffer_size():
                try:
                    if j - i > 1:
                        cmsg = [(socket.SOL_UDP, _UDP_SEGMENT, struct.pack("=H", len(data)))]
                        payload = [b"".join([d for d, _ in datagrams[i:j]])]
                        if connected:
                            sock.sendmsg(payload, cmsg)
                        else:
                            sock.sendmsg(payload, cmsg, 0, addr)
                    elif connected:
                        sock.send(data)
                    else:
                        sock.sendto(data, addr)
                    i = j
                    continue
                except BlockingIOError:
                    pass
                except OSError as exc:
                    if exc.errno == errno.EMSGSIZE:
                        too_big = True
                        i = j
                        continue
                    if j - i > 1:
                        self.gso = False  # no GSO here (old kernel, odd interface): plain sends
                    else:
                        if self.on_error is not None:
                            self.on_error(exc)
                        i = j
                        continue
            for k in range(i, j):
                if connected:
                    transport.sendto(datagrams[k][0])
                else:
                    transport.sendto(datagrams[k][0], datagrams[k][1])
            i = j
        return too_big


def _tune_socket(sock) -> None:
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        except OSError:  # pragma: no cover - platform dependent
            pass
    _set_dont_fragment(sock)


def _set_dont_fragment(sock) -> None:
    """DF bit on (RFC 9000 section 14): an oversize send fails with EMSGSIZE instead of being
    fragmented. Linux only; elsewhere the kernel's default stays."""
    if not sys.platform.startswith("linux"):
        return
    opts = [(socket.IPPROTO_IP, _IP_MTU_DISCOVER, _IP_PMTUDISC_DO)]
    if sock.family == socket.AF_INET6:
        opts.insert(0, (socket.IPPROTO_IPV6, _IPV6_MTU_DISCOVER, _IPV6_PMTUDISC_DO))
    for level, opt, value in opts:
        try:
            sock.setsockopt(level, opt, value)
        except OSError:  # pragma: no cover - v6-only socket, odd platform
            pass


def _env_datagram_size() -> int | None:
    """TUNNEL_QUIC_MAX_DATAGRAM_SIZE, clamped to what aioquic and QUIC allow (None: unset)."""
    raw = os.environ.get(DATAGRAM_SIZE_ENV)
    if not raw:
        return None
    try:
        size = int(raw)
    except ValueError:
        raise ValueError(f"{DATAGRAM_SIZE_ENV} must be an integer, got {raw!r}") from None
    return max(SMALLEST_MAX_DATAGRAM_SIZE, min(size, MAX_PATH_DATAGRAM_SIZE))


def _route_datagram_size(sock) -> int:
    """Largest UDP payload the route of a *connected* socket carries, capped at
    ``MAX_PATH_DATAGRAM_SIZE`` (``MAX_DATAGRAM_SIZE`` when the kernel cannot tell)."""
    if not sys.platform.startswith("linux"):
        return MAX_DATAGRAM_SIZE
    try:
        if sock.family == socket.AF_INET6:
            mtu, overhead = sock.getsockopt(socket.IPPROTO_IPV6, _IPV6_MTU), 48
        else:
            mtu, overhead = sock.getsockopt(socket.IPPROTO_IP, _IP_MTU), 28
    except OSError:
        return MAX_DATAGRAM_SIZE
    return max(SMALLEST_MAX_DATAGRAM_SIZE, min(mtu - overhead, MAX_PATH_DATAGRAM_SIZE))


def _peer_route_datagram_size(family: int, addr) -> int:
    """The server's route lookup towards ``addr``: a throwaway connected socket (connect on
    UDP sends nothing) asked for its route MTU."""
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(addr)
            return _route_datagram_size(probe)
    except OSError:
        return MAX_DATAGRAM_SIZE


def _close_code(event: qe.ConnectionTerminated) -> int:
    if event.reason_phrase == "Idle timeout":
        return ErrorCode.TIMEOUT
    if event.frame_type is None and event.error_code in ErrorCode._value2member_map_:
        return event.error_code
    return ErrorCode.PROTOCOL_ERROR if event.error_code else ErrorCode.NO_ERROR


class _QuicLinkStream(LinkStream):
    """One tunneled stream riding its own bidirectional QUIC stream."""

    __slots__ = ("link", "stream_id", "metadata", "handler", "_qs", "_queue", "_queued", "_paused",
                 "_eof_pending", "_eof_sent", "_eof_received", "_reset", "_closed", "_rx_consumed",
                 "_rx_seen", "_window", "_high", "_low", "_local", "_progress", "_half_closed", "_acked_mark")

    def __init__(self, link: "QuicLink", stream_id: int, metadata: bytes, qs) -> None:
        self.link = link
        self.stream_id = stream_id
        self.metadata = metadata
        self.handler: StreamHandler | None = None
        self._qs = qs  # aioquic's QuicStream (kept: aioquic forgets finished streams)
        self._queue: collections.deque = collections.deque()
        self._queued = 0
        self._paused = False
        self._eof_pending = False  # write_eof called, FIN not yet handed to aioquic
        self._eof_sent = False
        self._eof_received = False
        self._reset = False
        self._closed = False
        self._rx_consumed = 0  # stream offset up to which credit may be granted
        self._rx_seen = 0  # stream offset received so far (delivered or skipped)
        limits = link.limits
        self._window = limits.initial_stream_window
        self._high = limits.stream_send_high_water
        self._low = limits.stream_send_low_water
        self._local = (stream_id & 1 == 0) == link._is_client  # QUIC: client-initiated IDs are even
        self._progress = link._loop.time()  # last data in, out, or consumed
        self._half_closed = False
        self._acked_mark = 0  # peer-acknowledged send offset at the last half-close check

    # --- LinkStream API ------------------------------------------------------------

    def write(self, data) -> None:
        if self._reset or self._eof_pending or self._eof_sent or self.link._closed:
            raise StreamClosed(f"stream {self.stream_id} is closed for sending")
        n = len(data)
        if not n:
            return
        self._queue.append(data)
        self._queued += n
        link = self.link
        link._queued_total += n
        if self._queued > self._high:
            self._paused = True
        if link._queued_total > link._session_high_water:
            self._paused = True  # every writer pauses while the link's queues are too full
            link._session_paused.add(self)
        link._want_send(self)

    def write_eof(self) -> None:
        if self._reset or self._eof_pending or self._eof_sent or self.link._closed:
            return
        self._eof_pending = True
        self.link._want_send(self)

    def reset(self, code: int = ErrorCode.NO_ERROR) -> None:
        if self._reset or self._closed:
            return
        self._abort(int(code), notify=False)

    def consume(self, n: int) -> None:
        if self._closed or n <= 0:
            return
        self._rx_consumed += n
        link = self.link
        link._rx_consumed += n
        if self._half_closed:
            self._progress = link._loop.time()
        if link._conn.grant_stream(self._qs, self._rx_consumed, self._window) | link._conn.grant_connection(
                link._rx_consumed, link._session_window):
            link._schedule_transmit()

    @property
    def paused(self) -> bool:
        return self._paused

    # --- introspection -------------------------------------------------------------

    @property
    def send_buffered(self) -> int:
        """Outgoing bytes held in memory: our queue plus aioquic's unacknowledged buffer."""
        sender = self._qs.sender
        return self._queued + sender._buffer_stop - sender._buffer_start

    @property
    def receive_unconsumed(self) -> int:
        """Received bytes (delivered or buffered by aioquic) not yet consumed."""
        return self._qs.receiver.highest_offset - self._rx_consumed

    # --- carrier internals ---------------------------------------------------------

    def _feed(self) -> bool:
        """Hand aioquic what the peer's credit allows; return True if anything moved."""
        if self._reset:
            return False
        sender = self._qs.sender
        moved = False
        if self._queued:
            link = self.link
            room = min(self._qs.max_stream_data_remote, sender.highest_offset + _UNSENT_CHUNK) - sender._buffer_stop
            link_room = _LINK_UNSENT - (link._tx_fed - link._conn._remote_max_data_used)
            if link_room < room:
                room = link_room
            if room > 0:
                queue = self._queue
                parts = []
                take = 0
                while queue and take < room:
                    head = queue[0]
                    size = len(head)
                    if take + size <= room:
                        queue.popleft()
                        parts.append(head)
                        take += size
                    else:
                        cut = room - take
                        view = head if isinstance(head, memoryview) else memoryview(head)
                        parts.append(view[:cut])
                        queue[0] = view[cut:]
                        take += cut
                self._queued -= take
                link._queued_total -= take
                data = parts[0] if len(parts) == 1 else b"".join(parts)
                last = not self._queue and self._eof_pending
                sender.write(data, end_stream=last)
                if last:
                    self._eof_pending = False
                    self._eof_sent = True
                link.bytes_sent += take
                link._tx_fed += take
                if self._half_closed:
                    self._progress = link._loop.time()
                moved = True
        if self._eof_pending and not self._queued:
            sender.write(b"", end_stream=True)
            self._eof_pending = False
            self._eof_sent = True
            moved = True
        if moved:
            sender.buffer_is_empty = False
        return moved

    def _after_feed(self) -> None:
        if self._paused and self._queued <= self._low and self.link._queued_total <= self.link._session_high_water:
            self._paused = False
            self.link._session_paused.discard(self)
            if self.handler is not None:
                self.handler.writable()
        if self._eof_sent:
            self._maybe_closed()
            if not self._closed and not self._half_closed:
                self.link._enter_half_closed(self)

    def _data(self, data: bytes, fin: bool) -> None:
        self._rx_seen += len(data)
        if self._half_closed:
            self._progress = self.link._loop.time()
        if self._reset or self.handler is None:
            self._skip(len(data))
        elif data:
            self.link.bytes_received += len(data)
            self.handler.data_received(data)
        if fin and not self._reset and not self._eof_received:
            self._eof_received = True
            if self.handler is not None:
                self.handler.eof_received()
            self._maybe_closed()
            if not self._closed and not self._half_closed:
                self.link._enter_half_closed(self)

    def _skip(self, n: int) -> None:
        """Bytes the application never sees: give their credit back at once."""
        if n:
            self._rx_consumed += n
            self.link._rx_consumed += n
            self.link._conn.grant_stream(self._qs, self._rx_consumed, self._window)
            self.link._conn.grant_connection(self.link._rx_consumed, self.link._session_window)

    def _abort(self, code: int, notify: bool) -> None:
        """Reset both directions (ours, or in answer to the peer's RESET/STOP_SENDING)."""
        self._reset = True
        link = self.link
        link._queued_total -= self._queued
        self._queue.clear()
        self._queued = 0
        conn = link._conn
        sender = self._qs.sender
        link._tx_fed -= max(0, sender._buffer_stop - sender.highest_offset)  # never to be sent
        if not link._closed:
            try:
                conn.reset_stream(self.stream_id, code)
            except Exception:  # stream state already gone
                pass
            if not self._eof_received:
                try:
                    conn.stop_stream(self.stream_id, code)
                except Exception:
                    pass
            link._schedule_transmit()
        if notify and self.handler is not None:
            self.handler.reset_received(code)
        self._finish(notify)

    def _release_rest(self) -> None:
        """Unconsumed or late bytes of a finished stream stop counting against the link."""
        leftover = max(self._qs.receiver.highest_offset, self._rx_seen) - self._rx_consumed
        if leftover > 0:
            link = self.link
            link._rx_consumed += leftover
            self._rx_consumed += leftover
            link._conn.grant_connection(link._rx_consumed, link._session_window)

    def _maybe_closed(self) -> None:
        if self._eof_received and self._eof_sent and not self._closed:
            self._finish(True)

    def _finish(self, direct: bool) -> None:
        if self._closed:
            return
        self._closed = True
        link = self.link
        if link._streams.pop(self.stream_id, None) is not None and not self._local:
            link._peer_streams -= 1
        link._sending.discard(self)
        link._session_paused.discard(self)
        if self._half_closed:
            self._half_closed = False
            link._half_closed.discard(self)
        self._release_rest()
        handler = self.handler
        if handler is not None:
            if direct:
                handler.closed()
            else:
                link._loop.call_soon(handler.closed)


class _Incoming:
    """An incoming tunneled stream whose OPEN frame is not complete yet."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = bytearray()


class QuicLink(Link):
    """One agent-relay link over a QUIC connection (see the module docstring)."""

    transport = "quic"

    def __init__(self, conn: _BoundedConnection, limits: Limits, *, is_client: bool, send: Callable,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._conn = conn
        self.limits = limits
        self._is_client = is_client
        self._send = send  # send([(datagram, addr), ...])
        self._loop = loop or asyncio.get_running_loop()
        self.peer_address = ()
        self.bytes_sent = 0
        self.bytes_received = 0
        self._handler: LinkHandler | None = None
        self._backlog: list | None = []  # events held until a handler is installed
        self._streams: dict[int, _QuicLinkStream] = {}
        self._sending: set[_QuicLinkStream] = set()
        self._rx_consumed = 0
        self._session_window = limits.session_window
        self._decoder = frames.FrameDecoder(max(limits.max_frame_size, limits.max_control_size))
        self._hello_sent = False
        self._peer_hello = None
        self._version = 0
        self._held: list = []  # data-stream events held until the peer's HELLO
        self._quic_connected = False
        self._ready = asyncio.Event()  # QUIC handshake and HELLO exchange done
        self._closed = False  # no more I/O on the connection
        self._closing = False
        self._goaway_received = False
        self._close_info: tuple[int, str] | None = None
        self._terminated = self._loop.create_future()
        self._tx_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._last_rx = self._loop.time()
        self._last_ping = 0.0
        self._keepalive: asyncio.TimerHandle | None = None
        self._on_terminated: Callable | None = None  # the server forgets us
        self._on_ready: Callable | None = None
        self._highest_peer_stream = 0
        self._ping_payload = 0
        self.error: str | None = None
        #: Datagram size wanted after the handshake (path-derived or the env override).
        self._dgram_target = MAX_DATAGRAM_SIZE
        self._dgram_forced = False  # set by TUNNEL_QUIC_MAX_DATAGRAM_SIZE
        self._dgram_probing = False  # a large size is in use but no large packet was acked yet
        #: How often this link fell back to MAX_DATAGRAM_SIZE (EMSGSIZE or a black hole).
        self.datagram_fallbacks = 0
        # Flood accounting (per one-second window), as the WSS session does.
        self._ping_rate = PerSecond()
        self._churn_rate = PerSecond()
        # Half-closed streams and when the earliest may time out.
        self._half_closed: set = set()
        self._half_close_timer: asyncio.TimerHandle | None = None
        self._peer_streams = 0  # peer-opened streams currently open
        self._tx_fed = 0  # stream bytes handed to aioquic (all streams, control included)
        self._queued_total = 0  # bytes in our own stream queues, all streams
        self._session_high_water = limits.session_send_high_water
        self._session_paused: set = set()  # writers paused because of _queued_total
        self._close_pending: tuple[int, str] | None = None  # close waiting for control data
        self._close_timer: asyncio.TimerHandle | None = None

    # --- Link API ------------------------------------------------------------------

    def set_handler(self, handler: LinkHandler) -> None:
        self._handler = handler
        if self._backlog is not None:
            self._loop.call_soon(self._replay)

    def _replay(self) -> None:
        backlog, self._backlog = self._backlog, None
        for kind, item in backlog or ():
            if kind == "ctl":
                self._handler.control_received(item)
            elif kind == "ev":
                self._stream_event(item)
            elif kind == "closed":
                self._handler.link_closed(*item)
        self._schedule_transmit()

    def open_stream(self, metadata: bytes, handler: StreamHandler) -> LinkStream:
        if self._closed or self._closing or self._goaway_received or not self._ready.is_set():
            raise SessionClosed("link is closing" if self._ready.is_set() else "link is not ready")
        metadata = bytes(metadata)
        sid = self._conn.get_next_available_stream_id()
        header = frames.encode_frame(_OPEN, 0, 0, metadata)
        qs = self._conn._get_or_create_stream_for_send(sid)
        qs.sender = _ChunkSender(sid, True)
        qs.sender.write(header)
        self._tx_fed += len(header)
        stream = _QuicLinkStream(self, sid, metadata, qs)
        qs.tn = stream
        stream.handler = handler
        self._streams[sid] = stream
        self._schedule_transmit()
        return stream

    def send_control(self, message: dict) -> None:
        if self._closed:
            raise SessionClosed("link is closed")
        self._send_frame(FrameType.CONTROL, 0, encode_control(message, self.limits.max_control_size))

    def goaway(self, code: int = ErrorCode.NO_ERROR, reason: str = "") -> None:
        if self._closed or self._closing:
            return
        self._closing = True
        self._send_frame(FrameType.GOAWAY, 0, frames.encode_goaway(self._highest_peer_stream, int(code), reason))

    def close(self, code: int = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """Close now. Control frames already queued (a CONTROL error message, the GOAWAY this
        sends) reach the peer first: CONNECTION_CLOSE waits until the peer acknowledged them,
        at most ``CLOSE_FLUSH_TIMEOUT``. Streams are reset at once and ``link_closed`` follows
        at once either way."""
        self._close(int(code), reason, flush=True)

    def _close(self, code: int, reason: str, flush: bool) -> None:
        if self._closed:
            if self._close_pending is not None and not flush:
                self._close_flushed()
            return
        self._closing = True
        if self._hello_sent and code != ErrorCode.NO_ERROR:
            try:
                self._send_frame(FrameType.GOAWAY, 0, frames.encode_goaway(self._highest_peer_stream, code, reason))
            except Exception:
                pass
        if flush and self._control_unacked():
            conn = self._conn
            for sid in list(self._streams):  # stop their data now; the control stream goes on
                for call in (conn.reset_stream, conn.stop_stream):
                    try:
                        call(sid, code)
                    except Exception:
                        pass
            self._close_pending = (code, reason)
            self._close_timer = self._loop.call_later(CLOSE_FLUSH_TIMEOUT, self._close_flushed)
        else:
            self._conn.close(error_code=code, reason_phrase=reason[:1024])
        self._shutdown(code, reason)
        self._schedule_transmit()

    def _control_unacked(self) -> bool:
        """True while control-stream bytes we sent are not all acknowledged (and the QUIC
        connection is up to carry them)."""
        conn = self._conn
        if not self._quic_connected or conn._state != QuicConnectionState.CONNECTED:
            return False
        cs = conn._streams.get(CONTROL_STREAM_ID)
        if cs is None:
            return False
        sender = cs.sender
        return sender._buffer_start < sender._buffer_stop and sender._reset_error_code is None

    def _close_flushed(self) -> None:
        """The deferred CONNECTION_CLOSE: control data acknowledged, or its time is up."""
        if self._close_pending is None:
            return
        code, reason = self._close_pending
        self._close_pending = None
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        if self._conn._state == QuicConnectionState.CONNECTED:
            self._conn.close(error_code=code, reason_phrase=reason[:1024])
        self._schedule_transmit()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._terminated)

    @property
    def is_closing(self) -> bool:
        return self._closed or self._closing or self._goaway_received

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    @property
    def version(self) -> int:
        return self._version

    @property
    def datagram_size(self) -> int:
        """The largest UDP payload this side sends on the link now."""
        return self._conn._max_datagram_size

    # --- datagram size -------------------------------------------------------------

    def _apply_datagram_size(self) -> None:
        """After the handshake: move to the path's datagram size (never above what the peer
        announced it receives). Until the peer acknowledges one large packet the size is on
        probation: two probe timeouts in a row without an ACK fall back to 1452."""
        conn = self._conn
        target = self._dgram_target
        peer = conn.tn_peer_max_udp
        if peer is not None:
            target = min(target, peer)
        elif not self._is_client and not self._dgram_forced:
            target = MAX_DATAGRAM_SIZE  # a peer that announces nothing is not ours: standard size
        target = max(SMALLEST_MAX_DATAGRAM_SIZE, target)
        if target == conn._max_datagram_size:
            return
        conn.set_datagram_size(target)
        if target <= MAX_DATAGRAM_SIZE:
            return
        self._dgram_probing = True
        cc = conn._loss._cc
        original = cc.on_packet_acked

        def on_packet_acked(*, packet, now) -> None:
            if packet.sent_bytes > MAX_DATAGRAM_SIZE:
                self._end_probation()
            original(packet=packet, now=now)

        cc.on_packet_acked = on_packet_acked

    def _end_probation(self) -> None:
        self._dgram_probing = False
        cc = self._conn._loss._cc
        if "on_packet_acked" in vars(cc):
            del cc.on_packet_acked  # back to the class's method: no cost per ACK

    def _datagram_too_big(self, why: str) -> None:
        """The path does not carry our datagrams: standard size from now on (and QUIC's
        minimum, 1200, if even 1452 is refused, as on a narrow IPv6 tunnel with DF set)."""
        conn = self._conn
        current = conn._max_datagram_size
        if current > MAX_DATAGRAM_SIZE:
            size = MAX_DATAGRAM_SIZE
        elif current > SMALLEST_MAX_DATAGRAM_SIZE:
            size = SMALLEST_MAX_DATAGRAM_SIZE
        else:
            return
        self._end_probation()
        conn.set_datagram_size(size)
        self.datagram_fallbacks += 1
        log.info("QUIC link to %s: %s, datagrams down to %d bytes", self.peer_address, why, size)

    # --- I/O entry points ----------------------------------------------------------

    def datagram_received(self, data: bytes, addr) -> None:
        if self._conn._state == QuicConnectionState.TERMINATED:
            return
        now = self._loop.time()
        self._last_rx = now
        self._conn.receive_datagram(data, addr, now)
        self._process_events()
        self._schedule_transmit()

    def connection_lost(self, exc) -> None:
        """The UDP socket is gone: the link is over."""
        if not self._closed:
            self._shutdown(ErrorCode.CONNECTION_RESET, f"socket closed: {exc}" if exc else "socket closed")
        self._terminate()

    # --- sending -------------------------------------------------------------------

    def _send_frame(self, ftype: int, flags: int, payload: bytes) -> None:
        frame = frames.encode_frame(int(ftype), flags, 0, payload)
        self._conn.send_stream_data(CONTROL_STREAM_ID, frame)
        self._tx_fed += len(frame)
        self._schedule_transmit()

    def _want_send(self, stream: _QuicLinkStream) -> None:
        self._sending.add(stream)
        self._schedule_transmit()

    def _schedule_transmit(self) -> None:
        if not self._tx_scheduled:
            self._tx_scheduled = True
            self._loop.call_soon(self._transmit)

    def _transmit(self) -> None:
        self._tx_scheduled = False
        conn = self._conn
        send = self._send
        loop_time = self._loop.time
        sending = self._sending
        fed_any: set | None = None
        while True:
            if sending and not self._closed:
                for s in list(sending):
                    if s._feed():
                        if fed_any is None:
                            fed_any = set()
                        fed_any.add(s)
                    if not s._queued and not s._eof_pending:
                        sending.discard(s)
            datagrams = conn.datagrams_to_send(now=loop_time())
            if not datagrams:
                break
            if send(datagrams):
                self._datagram_too_big("EMSGSIZE: datagram larger than the path MTU")
        if self._close_pending is not None and not self._control_unacked():
            self._close_flushed()
        # Callbacks after the batch: resumed writers, finished streams.
        if fed_any:
            for s in fed_any:
                if not s._closed:
                    s._after_feed()
        if self._session_paused and self._queued_total <= self._session_high_water:
            for s in list(self._session_paused):
                if s._closed or not s._paused:
                    self._session_paused.discard(s)
                elif s._queued <= s._low:
                    s._after_feed()
        self._process_events()
        timer_at = conn.get_timer()
        if self._timer is not None and self._timer_at != timer_at:
            self._timer.cancel()
            self._timer = None
        if self._timer is None and timer_at is not None:
            self._timer = self._loop.call_at(timer_at, self._on_timer)
        self._timer_at = timer_at

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        conn = self._conn
        conn.handle_timer(now=self._loop.time())
        if self._dgram_probing and conn._loss._pto_count >= 2:
            self._datagram_too_big("no acknowledgement of large datagrams")
        self._process_events()
        self._transmit()

    # --- events --------------------------------------------------------------------

    def _process_events(self) -> None:
        conn = self._conn
        while True:
            event = conn.next_event()
            if event is None:
                return
            cls = type(event)
            if cls is qe.StreamDataReceived:
                if event.stream_id == CONTROL_STREAM_ID:
                    self._control_data(event)
                elif self._peer_hello is None or self._backlog is not None:
                    (self._held if self._peer_hello is None else self._backlog).append(("ev", event))
                else:
                    self._stream_event(event)
            elif cls is qe.StreamReset or cls is qe.StopSendingReceived:
                if event.stream_id == CONTROL_STREAM_ID:
                    self._fail(ErrorCode.PROTOCOL_ERROR, "control stream reset")
                elif self._peer_hello is None:
                    self._held.append(("ev", event))
                elif self._backlog is not None:
                    self._backlog.append(("ev", event))
                else:
                    self._stream_event(event)
            elif cls is qe.HandshakeCompleted:
                self._handshake_completed(event)
            elif cls is qe.ConnectionTerminated:
                if not self._closed:
                    self._shutdown(_close_code(event), event.reason_phrase or "connection closed")
                self._terminate()
            elif cls is qe.ConnectionIdIssued:
                if self._server_cid_issued is not None:
                    self._server_cid_issued(event.connection_id)
            elif cls is qe.ConnectionIdRetired:
                if self._server_cid_retired is not None:
                    self._server_cid_retired(event.connection_id)

    _server_cid_issued: Callable | None = None
    _server_cid_retired: Callable | None = None
    #: Server side: sets ``_dgram_target`` from a route lookup once the handshake is done.
    _on_datagram_target: Callable | None = None

    def _handshake_completed(self, event) -> None:
        self._quic_connected = True
        if event.alpn_protocol != QUIC_ALPN:
            self._fail(ErrorCode.PROTOCOL_ERROR, "ALPN tunnel/1 not negotiated")
            return
        if self._on_datagram_target is not None:
            self._on_datagram_target(self)
        self._apply_datagram_size()
        if self._is_client:
            self._send_hello()
            self._start_keepalive()

    def _send_hello(self) -> None:
        if self._hello_sent:
            return
        self._hello_sent = True
        limits = self.limits
        hello = frames.encode_hello(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, limits.initial_stream_window,
                                    limits.session_window, limits.max_frame_size, limits.max_concurrent_streams)
        self._send_frame(FrameType.HELLO, 0, hello)

    def _control_data(self, event) -> None:
        if self._closed:
            return
        data = event.data
        cs = self._conn._streams.get(CONTROL_STREAM_ID)
        # Control bytes are parsed at once: their credit goes straight back.
        if cs is not None and data:
            self._rx_consumed += len(data)
            self._conn.grant_stream(cs, cs.receiver.highest_offset, self.limits.initial_stream_window)
            self._conn.grant_connection(self._rx_consumed, self._session_window)
        if not self._is_client and not self._hello_sent:
            self._send_hello()
            self._start_keepalive()
        try:
            for ftype, flags, _sid, payload in self._decoder.feed(data):
                self._control_frame(ftype, flags, payload)
                if self._closed:
                    return
        except ProtocolError as exc:
            self._fail(exc.code, str(exc))
            return
        if event.end_stream and not self._closed:
            self._fail(ErrorCode.PROTOCOL_ERROR, "control stream ended")

    def _control_frame(self, ftype: int, flags: int, payload) -> None:
        if self._peer_hello is None:
            if ftype != FrameType.HELLO:
                raise ProtocolError("first frame is not HELLO")
            hello = frames.parse_hello(payload)
            lo, hi = hello[0], hello[1]
            version = min(hi, PROTOCOL_VERSION)
            if version < max(lo, MIN_PROTOCOL_VERSION):
                self._send_frame(FrameType.GOAWAY, 0, frames.encode_goaway(0, ErrorCode.VERSION_MISMATCH,
                                                                           "no common protocol version"))
                self._fail(ErrorCode.VERSION_MISMATCH, "no common protocol version")
                return
            self._peer_hello = hello
            self._version = version
            held, self._held = self._held, []
            for item in held:
                if self._backlog is not None:
                    self._backlog.append(item)
                else:
                    self._stream_event(item[1])
            if not self._ready.is_set():
                self._ready.set()
                if self._on_ready is not None:
                    self._on_ready(self)
            return
        if ftype == FrameType.PING:
            if not flags & Flags.ACK:
                if self._ping_rate.count(self._loop.time()) > self.limits.max_ping_rate:
                    raise FloodError("PING flood")
                self._send_frame(FrameType.PING, Flags.ACK, bytes(payload))
        elif ftype == FrameType.CONTROL:
            message = decode_control(payload, self.limits.max_control_size)
            if self._backlog is not None:
                self._backlog.append(("ctl", message))
            else:
                self._handler.control_received(message)
        elif ftype == FrameType.GOAWAY:
            _last, code, reason = frames.parse_goaway(payload)
            self._goaway_received = True
            if code != ErrorCode.NO_ERROR:
                self._fail(code, reason or "peer sent GOAWAY")
        elif ftype == FrameType.HELLO:
            raise ProtocolError("second HELLO")
        else:
            raise ProtocolError(f"{FrameType(ftype).name} frame on the QUIC control stream")

    def _stream_event(self, event) -> None:
        if self._closed:
            return
        sid = event.stream_id
        qs = self._conn._streams.get(sid)
        if qs is None:  # aioquic already forgot it
            return
        state = getattr(qs, "tn", None)
        if type(event) is not qe.StreamDataReceived:
            # Churn: a peer stream first seen reset counts as its open and its reset; a live
            # stream's reset counts once; the answer to our own reset is not the peer's churn.
            if state is None and not getattr(qs, "tn_done", False):
                self._highest_peer_stream = max(self._highest_peer_stream, sid)
                if not (self._count_churn() and self._count_churn()):
                    return
            elif type(event) is qe.StreamReset and (type(state) is _Incoming or (
                    type(state) is _QuicLinkStream and not (state._reset or state._closed))):
                if not self._count_churn():
                    return
            code = event.error_code if event.error_code in ErrorCode._value2member_map_ else ErrorCode.PROTOCOL_ERROR
            if type(state) is _QuicLinkStream:
                if not state._reset and not state._closed:
                    state._abort(code, notify=True)
            elif not getattr(qs, "tn_done", False):
                qs.tn_done = True
                qs.tn = None
                self._reset_raw(qs, code)
            return
        if type(state) is _QuicLinkStream:
            if state._closed:
                state._release_rest()
            else:
                state._data(event.data, event.end_stream)
            return
        if getattr(qs, "tn_done", False):
            self._reset_raw(qs, None)
            return
        # A stream the peer opened: collect its OPEN frame.
        if state is None:
            if not self._count_churn():
                return
            state = qs.tn = _Incoming()
            self._highest_peer_stream = max(self._highest_peer_stream, sid)
        buf = state.buf
        buf += event.data
        bad = False
        if len(buf) >= HEADER_SIZE:
            ftype, flags, reserved, fsid, length = _HEADER.unpack_from(buf, 0)
            bad = ftype != _OPEN or reserved or fsid or flags & ~int(Flags.FIN) or length > MAX_METADATA
            complete = len(buf) >= HEADER_SIZE + length
        else:
            complete = False
        if bad or (not complete and event.end_stream):
            qs.tn = None
            qs.tn_done = True
            self._reset_raw(qs, ErrorCode.PROTOCOL_ERROR)
            return
        if not complete:
            return
        stream = _QuicLinkStream(self, sid, bytes(buf[HEADER_SIZE:HEADER_SIZE + length]), qs)
        qs.tn = stream
        if type(qs.sender) is QuicStreamSender and not qs.sender._buffer_stop:
            qs.sender = _ChunkSender(sid, True)
        stream._rx_seen = HEADER_SIZE + length
        stream._skip(HEADER_SIZE + length)
        rest = bytes(buf[HEADER_SIZE + length:])
        self._streams[sid] = stream
        self._peer_streams += 1
        if self._closing or self._goaway_received:
            stream._abort(ErrorCode.REFUSED, notify=False)
            return
        if self._peer_streams > self.limits.max_concurrent_streams:
            stream._abort(ErrorCode.STREAM_LIMIT, notify=False)
            return
        handler = self._handler.stream_opened(stream)
        if stream._reset or stream._closed:
            return
        if handler is None:
            stream._abort(ErrorCode.REFUSED, notify=False)
            return
        stream.handler = handler
        stream._data(rest, event.end_stream or bool(flags & Flags.FIN))

    def _reset_raw(self, qs, code: int | None) -> None:
        """Refuse a peer stream that never became a LinkStream (``code`` None: late data)."""
        credited = getattr(qs, "tn_credit", 0)
        qs.tn_credit = qs.receiver.highest_offset
        self._rx_consumed += qs.tn_credit - credited
        self._conn.grant_connection(self._rx_consumed, self._session_window)
        if code is None:
            return
        for call in (self._conn.reset_stream, self._conn.stop_stream):
            try:
                call(qs.stream_id, code)
            except Exception:
                pass
        self._schedule_transmit()

    # --- flood and idle-stream limits (the WSS session's, checked the same way) ------------

    def _count_churn(self) -> bool:
        """Count one stream open or reset by the peer; False once the link closed for it."""
        if self._churn_rate.count(self._loop.time()) > self.limits.max_stream_churn_rate:
            self._fail(ErrorCode.ENHANCE_YOUR_CALM, "stream open/reset flood")
            return False
        return True

    def _enter_half_closed(self, stream: _QuicLinkStream) -> None:
        stream._half_closed = True
        stream._progress = self._loop.time()
        self._half_closed.add(stream)
        if self._half_close_timer is None:
            self._half_close_timer = self._loop.call_later(self.limits.half_close_timeout, self._expire_half_closed)

    def _expire_half_closed(self) -> None:
        """Reset (TIMEOUT) half-closed streams without progress for ``half_close_timeout``."""
        self._half_close_timer = None
        if self._closed:
            return
        now = self._loop.time()
        timeout = self.limits.half_close_timeout
        next_at = None
        for stream in list(self._half_closed):
            acked = stream._qs.sender._buffer_start
            if acked != stream._acked_mark:  # the peer took more of our data: progress too
                stream._acked_mark = acked
                stream._progress = now
            deadline = stream._progress + timeout
            if deadline <= now:
                if not stream._closed:
                    stream._abort(ErrorCode.TIMEOUT, notify=True)
                self._half_closed.discard(stream)
            elif next_at is None or deadline < next_at:
                next_at = deadline
        if next_at is not None:
            self._half_close_timer = self._loop.call_at(next_at, self._expire_half_closed)

    # --- keepalive -----------------------------------------------------------------

    def _start_keepalive(self) -> None:
        if self._keepalive is None and not self._closed:
            self._keepalive = self._loop.call_later(self.limits.keepalive_interval, self._keepalive_tick)

    def _keepalive_tick(self) -> None:
        self._keepalive = None
        if self._closed:
            return
        limits = self.limits
        now = self._loop.time()
        silent = now - self._last_rx
        if silent >= limits.keepalive_timeout:
            self._fail(ErrorCode.TIMEOUT, "keepalive timeout: no packets from the peer")
            return
        if silent >= limits.keepalive_interval and now - self._last_ping >= limits.keepalive_interval:
            self._last_ping = now
            self._ping_payload += 1
            self._send_frame(FrameType.PING, 0, self._ping_payload.to_bytes(8, "big"))
        due = min(self._last_rx + limits.keepalive_timeout,
                  max(self._last_rx, self._last_ping) + limits.keepalive_interval)
        self._keepalive = self._loop.call_at(max(due, now + 0.01), self._keepalive_tick)

    # --- ending --------------------------------------------------------------------

    def _fail(self, code: int, reason: str) -> None:
        if not self._closed:
            self.close(code, reason)

    def _shutdown(self, code: int, reason: str) -> None:
        """Mark the link closed; reset every stream; tell the handler (once)."""
        if self._closed:
            return
        self._closed = True
        self._closing = True
        self.error = reason
        self._close_info = (code, reason)
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        if self._on_handshake_slot is not None:
            self._on_handshake_slot()
        streams = list(self._streams.values())
        self._streams.clear()
        self._sending.clear()
        self._peer_streams = 0
        self._half_closed.clear()
        if self._half_close_timer is not None:
            self._half_close_timer.cancel()
            self._half_close_timer = None

        def notify() -> None:
            for stream in streams:
                if not stream._closed:
                    stream._reset = True
                    stream._queue.clear()
                    stream._queued = 0
                    if stream.handler is not None:
                        stream.handler.reset_received(code if code else ErrorCode.CONNECTION_RESET)
                    stream._finish(True)
            if self._backlog is not None:
                self._backlog.append(("closed", (code, reason)))
            elif self._handler is not None:
                self._handler.link_closed(code, reason)

        self._loop.call_soon(notify)

    _on_handshake_slot: Callable | None = None

    def _terminate(self) -> None:
        self._close_pending = None
        for handle in (self._timer, self._close_timer, self._half_close_timer):
            if handle is not None:
                handle.cancel()
        self._timer = self._close_timer = self._half_close_timer = None
        if self._on_terminated is not None:
            callback, self._on_terminated = self._on_terminated, None
            callback(self)
        if not self._terminated.done():
            self._terminated.set_result(None)


# --- client --------------------------------------------------------------------------


class _ClientProtocol(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.link: QuicLink | None = None
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data, addr) -> None:
        if self.link is not None:
            self.link.datagram_received(data, addr)

    def error_received(self, exc) -> None:
        link = self.link
        if link is not None and getattr(exc, "errno", None) == errno.EMSGSIZE:
            link._datagram_too_big("EMSGSIZE: the path MTU shrank")
            return
        # ICMP port unreachable before the link is up: nobody listens on UDP, fail fast
        # (``auto://`` then falls back to WSS). Later, QUIC's own timers decide.
        if link is not None and not link._ready.is_set() and not link._closed:
            link._fail(ErrorCode.CONNECT_FAILED, f"UDP unreachable: {exc}")

    def connection_lost(self, exc) -> None:
        if self.link is not None:
            self.link.connection_lost(exc)


def _system_cafile() -> str | None:
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile, "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and os.path.exists(candidate):
            return candidate
    return None  # aioquic falls back to certifi's bundle


async def connect_quic(host: str, port: int, *, ca_file: str | None, server_name: str | None, limits: Limits,
                       timeout: float) -> QuicLink:
    """Dial the relay over QUIC and exchange HELLOs; raise ``LinkError`` on any failure.

    The relay's certificate is always verified: against ``ca_file`` when given, else the
    system trust store.
    """
    loop = asyncio.get_running_loop()
    config = _configuration(limits, is_client=True)
    config.server_name = server_name or host
    config.load_verify_locations(cafile=ca_file or _system_cafile())
    protocol = _ClientProtocol()
    transport = None
    link: QuicLink | None = None
    try:
        async with asyncio.timeout(timeout):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            if not infos:
                raise LinkError(f"cannot resolve {host}")
            family, _, _, _, addr = infos[0]
            sock = _udp_socket(family, connect=addr)
            transport, _ = await loop.create_datagram_endpoint(lambda: protocol, sock=sock)
            peer = sock.getpeername()
            override = _env_datagram_size()
            target = override or _route_datagram_size(sock)
            # A route narrower than 1452 (PPPoE, tunnels): the handshake fits it too.
            config.max_datagram_size = max(SMALLEST_MAX_DATAGRAM_SIZE, min(config.max_datagram_size, target))
            conn = _BoundedConnection(configuration=config)
            conn.tn_local_max_udp = max(target, MAX_DATAGRAM_SIZE)  # what we receive on this path
            _set_stream_limits(conn, limits)
            sender = _UdpSender(transport, sock, connected=True, on_error=protocol.error_received)
            link = QuicLink(conn, limits, is_client=True, send=sender.send, loop=loop)
            link._dgram_target = target
            link._dgram_forced = override is not None
            link.peer_address = peer
            link._transport = transport
            link._on_terminated = lambda _link: transport.close()
            protocol.link = link
            conn.connect(peer, now=loop.time())
            link._transmit()
            ready = asyncio.ensure_future(link._ready.wait())
            try:
                await asyncio.wait([ready, link._terminated], return_when=asyncio.FIRST_COMPLETED)
            finally:
                ready.cancel()
            if not link._ready.is_set():
                raise LinkError(f"QUIC connection to {host}:{port} failed: {link.error or 'closed'}")
            return link
    except TimeoutError:
        if link is not None:
            link.close(ErrorCode.TIMEOUT, "handshake timeout")
        elif transport is not None:
            transport.close()
        raise LinkError(f"QUIC connection to {host}:{port} timed out after {timeout} s") from None
    except LinkError:
        if link is not None:
            link.close(ErrorCode.INTERNAL_ERROR, "connect failed")
        elif transport is not None:
            transport.close()
        raise
    except OSError as exc:
        if transport is not None:
            transport.close()
        raise LinkError(f"QUIC connection to {host}:{port} failed: {exc}") from None


def _set_stream_limits(conn: QuicConnection, limits: Limits) -> None:
    """Peers may open ``max_concurrent_streams`` bidi streams (plus the control stream and some
    slack: a QUIC stream outlives our view of it until both sides' last frames are
    acknowledged, and beyond the limit our answer is a prompt RESET with STREAM_LIMIT, as on
    WSS, not a silent wait) and no uni streams. aioquic raises the bidi limit by one for each
    peer stream that finishes."""
    bidi = conn._local_max_streams_bidi
    slack = max(8, limits.max_concurrent_streams // 8)
    bidi.value = bidi.sent = limits.max_concurrent_streams + 1 + slack
    uni = conn._local_max_streams_uni
    uni.value = uni.sent = 0


# --- server --------------------------------------------------------------------------


class QuicServer(asyncio.DatagramProtocol):
    """One UDP socket accepting QUIC links; see :func:`serve_quic`."""

    def __init__(self, configuration: QuicConfiguration, limits: Limits, on_link: Callable[[Link], None],
                 max_connections: int) -> None:
        self._configuration = configuration
        self._cid_length = configuration.connection_id_length
        self.limits = limits
        self._on_link = on_link
        self.max_connections = max_connections
        self._loop = asyncio.get_running_loop()
        self._links: dict[bytes, QuicLink] = {}
        self._all: set[QuicLink] = set()
        self._handshakes = PendingHandshakes(limits.max_pending_handshakes)
        self._retry = QuicRetryTokenHandler()
        self.retries = 0  #: Retry packets sent (address validation under load)
        self._transport = None
        self._closed = asyncio.Event()
        self.port = 0
        self.refused = 0
        self._sock: socket.socket | None = None
        self._sender: _UdpSender | None = None

    @property
    def pending_handshakes(self) -> int:
        return len(self._handshakes)

    @property
    def evicted(self) -> int:
        """Handshakes given up to make room for newcomers."""
        return self._handshakes.evicted

    @property
    def connection_count(self) -> int:
        return len(self._all)

    def connection_made(self, transport) -> None:
        self._transport = transport
        self._sender = _UdpSender(transport, self._sock, connected=False, on_error=self.error_received)

    def error_received(self, exc) -> None:
        pass

    def connection_lost(self, exc) -> None:
        for link in list(self._all):
            link.connection_lost(exc)
        self._closed.set()

    def close(self) -> None:
        """Close every link (CONNECTION_CLOSE sent) and stop listening."""
        for link in list(self._all):
            link._close(ErrorCode.NO_ERROR, "relay shutting down", flush=False)
            link._transmit()
        if self._transport is not None:
            self._transport.close()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def _sendto(self, datagrams) -> bool:
        return self._sender.send(datagrams)

    def datagram_received(self, data: bytes, addr) -> None:
        # Fast path for 1-RTT (short header) packets of known connections: the destination
        # connection ID sits right after the first byte, with the length we issue.
        if data and not data[0] & 0x80:
            link = self._links.get(data[1:1 + self._cid_length])
            if link is not None:
                link.datagram_received(data, addr)
                return
        buf = Buffer(data=data)
        try:
            header = pull_quic_header(buf, host_cid_length=self._configuration.connection_id_length)
        except ValueError:
            return
        link = self._links.get(header.destination_cid)
        if link is not None:
            link.datagram_received(data, addr)
            return
        if header.packet_type == QuicPacketType.VERSION_NEGOTIATION or header.version is None:
            return
        if header.version not in self._configuration.supported_versions:
            self._transport.sendto(encode_quic_version_negotiation(
                source_cid=header.destination_cid, destination_cid=header.source_cid,
                supported_versions=self._configuration.supported_versions), addr)
            return
        if header.packet_type != QuicPacketType.INITIAL or len(data) < SMALLEST_MAX_DATAGRAM_SIZE:
            return
        now = self._loop.time()
        original_cid, retry_cid = header.destination_cid, None
        if header.token:
            # We issue no NEW_TOKEN, so a token is one of our Retry tokens.
            try:
                original_cid = self._retry.validate_token(address=addr, destination_cid=header.destination_cid,
                                                          token=header.token, now=now)
            except ValueError:
                self.refused += 1
                return
            retry_cid = header.destination_cid
        elif 2 * len(self._handshakes) >= self.limits.max_pending_handshakes:
            self._send_retry(header, addr, now)
            return
        if len(self._all) >= self.max_connections or not self._handshakes.make_room(now, self._evict):
            self.refused += 1
            self._transport.sendto(_refuse_datagram(header.version, header.destination_cid, header.source_cid), addr)
            return
        self._accept(header, data, addr, original_cid, retry_cid)

    def _send_retry(self, header, addr, now: float) -> None:
        retry_cid = os.urandom(self._cid_length)
        token = self._retry.create_token(address=addr, original_destination_connection_id=header.destination_cid,
                                         retry_source_connection_id=retry_cid, now=now)
        self.retries += 1
        self._transport.sendto(encode_quic_retry(
            version=header.version, source_cid=retry_cid, destination_cid=header.source_cid,
            original_destination_cid=header.destination_cid, retry_token=token), addr)

    @staticmethod
    def _evict(link: QuicLink) -> None:
        """Give up a stale handshake to make room (see :mod:`tunnel.carriers.handshakes`)."""
        if link._on_handshake_slot is not None:
            link._on_handshake_slot()
        link.close(ErrorCode.TIMEOUT, "handshake evicted: too many handshakes in progress")

    def _accept(self, header, data: bytes, addr, original_cid: bytes, retry_cid: bytes | None) -> None:
        conn = _BoundedConnection(configuration=self._configuration,
                                  original_destination_connection_id=original_cid,
                                  retry_source_connection_id=retry_cid)
        _set_stream_limits(conn, self.limits)
        link = QuicLink(conn, self.limits, is_client=False, send=self._sendto, loop=self._loop)
        link.peer_address = addr
        self._all.add(link)
        self._links[header.destination_cid] = link
        self._links[conn.host_cid] = link
        cids = {header.destination_cid, conn.host_cid}

        def issued(cid: bytes) -> None:
            cids.add(cid)
            self._links[cid] = link

        def retired(cid: bytes) -> None:
            cids.discard(cid)
            self._links.pop(cid, None)

        def terminated(_link: QuicLink) -> None:
            for cid in cids:
                if self._links.get(cid) is link:
                    del self._links[cid]
            self._all.discard(link)

        link._server_cid_issued = issued
        link._server_cid_retired = retired
        link._on_terminated = terminated

        # Handshake slot and deadline: QUIC handshake + HELLO + authentication.
        self._handshakes.admit(link, addr[0], self._loop.time())
        deadline = self._loop.call_later(self.limits.handshake_timeout, self._handshake_expired, link)

        def release() -> None:
            link._on_handshake_slot = None
            link.on_handshake_done = None
            deadline.cancel()
            self._handshakes.forget(link)

        link._on_handshake_slot = release
        link.on_handshake_done = release
        link._on_ready = self._link_ready
        link._on_datagram_target = self._datagram_target
        link.datagram_received(data, addr)

    def _datagram_target(self, link: QuicLink) -> None:
        override = _env_datagram_size()
        if override is not None:
            link._dgram_target, link._dgram_forced = override, True
        else:
            family = self._sock.family if self._sock is not None else socket.AF_INET
            link._dgram_target = _peer_route_datagram_size(family, link.peer_address[:2] if family == socket.AF_INET
                                                           else link.peer_address)

    def _handshake_expired(self, link: QuicLink) -> None:
        if link._on_handshake_slot is not None:
            link.close(ErrorCode.TIMEOUT, "handshake deadline exceeded")

    def _link_ready(self, link: QuicLink) -> None:
        try:
            self._on_link(link)
        except Exception:
            log.exception("on_link failed")
            link.close(ErrorCode.INTERNAL_ERROR, "internal error")


async def serve_quic(host: str, port: int, *, cert_file: str, key_file: str, limits: Limits,
                     on_link: Callable[[Link], None], max_connections: int = DEFAULT_MAX_CONNECTIONS) -> QuicServer:
    """Listen for QUIC links on UDP ``host:port`` (port 0 picks one; see ``.port``).

    ``on_link(link)`` runs once a link's QUIC handshake and HELLO exchange are done; the
    relay must call ``link.handshake_done()`` after authenticating it, within
    ``limits.handshake_timeout`` of the connection's first packet, or the link is closed.
    """
    loop = asyncio.get_running_loop()
    config = _configuration(limits, is_client=False)
    config.load_cert_chain(cert_file, key_file)
    family = socket.AF_INET6 if _is_ipv6(host) else socket.AF_INET
    sock = _udp_socket(family, bind=(host, port))
    server = QuicServer(config, limits, on_link, max_connections)
    server._sock = sock
    await loop.create_datagram_endpoint(lambda: server, sock=sock)
    server.port = sock.getsockname()[1]
    return server


def _is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False
