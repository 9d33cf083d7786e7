"""One agent-relay link over a QUIC connection: a :class:`tunnel.carriers.base.Link` on
aioquic's sans-IO ``QuicConnection`` (through :mod:`tunnel.carriers.quic.compat`).

Mapping (docs/PROTOCOL.md, "QUIC mapping"): the agent's first bidirectional stream (QUIC
stream 0) is the control stream and carries our frames (HELLO, CONTROL, PING, GOAWAY) in the
codec's format; every tunneled stream is its own bidirectional QUIC stream, whose first bytes
are one OPEN frame (stream ID field 0, payload the metadata), then raw bytes; QUIC FIN is the
half-close; a reset is RESET_STREAM + STOP_SENDING carrying our error code.

The link's rules are the session's: HELLO checks, keepalive and round trip, PING, stream-churn
and CONTROL flood limits, going away, admission of peer streams, half-close deadlines, send
watermarks and receive credit all come from :mod:`tunnel.core.policy`; how events reach the
application from :mod:`tunnel.carriers.dispatch`. What is QUIC's own here:

- *Receive credit follows consumption*: limits start at ``initial_stream_window`` /
  ``session_window`` (transport parameters) and move only in
  :meth:`tunnel.carriers.quic.stream.QuicLinkStream.consume`. Bytes the application never
  sees (OPEN headers, control frames, data of a stream already reset) are consumed by the
  link itself; a finished stream gives its unconsumed bytes back.
- *Sends are bounded*: ``write`` queues in the stream's own deque; the link hands aioquic at
  most what the peer's stream credit allows and never more than ``quic_unsent_per_stream``
  beyond what aioquic already sent (``quic_unsent_per_link`` across the link), so aioquic's
  buffers hold at most the peer's windows (in flight) plus those bounds.
- ``close`` sends what is queued on the control stream first (a CONTROL error message, the
  GOAWAY): CONNECTION_CLOSE follows once the peer acknowledged it, or after
  :data:`CLOSE_FLUSH_TIMEOUT`. The application sees the link closed at once either way.
- Datagram size (see :mod:`tunnel.carriers.quic.udp`): after the handshake the link moves to
  the path's size, never above what the peer announced; until one large packet is
  acknowledged the size is on probation, and ``EMSGSIZE`` or two probe timeouts in a row
  drop it back to 1452 (then 1200).
- Sends are coalesced: one ``call_soon`` per loop iteration feeds the streams and writes
  every datagram aioquic has.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable

from aioquic.quic import events as qe

from tunnel import codec as frames
from tunnel.carriers.base import Link, LinkHandler, LinkStream, StreamHandler
from tunnel.carriers.dispatch import Dispatcher
from tunnel.carriers.quic.compat import (
    BoundedConnection,
    acked_offset,
    attach,
    attachment,
    granted_offset,
    received_offset,
    unacked,
    unsent_bytes,
    use_chunk_sender,
    written_offset,
)
from tunnel.carriers.quic.stream import QuicLinkStream
from tunnel.carriers.quic.udp import MAX_DATAGRAM_SIZE, SMALLEST_MAX_DATAGRAM_SIZE
from tunnel.core.limits import Limits
from tunnel.core.policy import (
    KEEPALIVE_PING,
    KEEPALIVE_TIMEOUT,
    LinkPolicy,
    SendWatermarks,
    accept_hello,
    check_reply_backlog,
    hello_payload,
)
from tunnel.wire.constants import HEADER_SIZE, QUIC_ALPN, ErrorCode, Flags, FrameType
from tunnel.wire.control import encode_control
from tunnel.wire.errors import ProtocolError, SessionClosed, UsageError

__all__ = ["CONTROL_STREAM_ID", "QuicLink"]

log = logging.getLogger("tunnel.carriers.quic")

CONTROL_STREAM_ID = 0
#: Flush bound for control frames queued before ``close`` (seconds).
CLOSE_FLUSH_TIMEOUT = 1.0
#: How much later than now aioquic's timer is armed when it names a time already past.
TIMER_GRANULARITY = 0.001
_HEADER = struct.Struct("!BBHII")
_OPEN = int(FrameType.OPEN)
_FIN = int(Flags.FIN)


def _close_code(event: qe.ConnectionTerminated) -> int:
    if event.reason_phrase == "Idle timeout":
        return ErrorCode.TIMEOUT
    if event.frame_type is None and ErrorCode.known(event.error_code):
        return event.error_code
    return ErrorCode.PROTOCOL_ERROR if event.error_code else ErrorCode.NO_ERROR


def _stream_code(code: int) -> int:
    return code if ErrorCode.known(code) else ErrorCode.PROTOCOL_ERROR


class _Incoming:
    """A peer stream whose OPEN frame is not complete yet."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = bytearray()


class _Refused:
    """A peer stream that never became a :class:`QuicLinkStream` (refused, malformed): late
    data is dropped and its credit given back."""

    __slots__ = ("credited",)

    def __init__(self) -> None:
        self.credited = 0


class QuicLink(Link):
    """One agent-relay link over a QUIC connection (see the module docstring).

    ``send([(datagram, addr), ...])`` writes datagrams and returns True if the path refused
    one as too big; ``datagram_target()`` gives ``(size, forced)``, the datagram size wanted
    after the handshake and whether it was forced by configuration. The server passes the
    rest: ``on_ready(link)`` once HELLOs are exchanged, ``on_terminated(link)`` once the
    connection is gone, ``on_cid_issued(cid)`` / ``on_cid_retired(cid)`` as connection IDs
    change, ``on_handshake_done()`` to release its handshake slot.
    """

    carrier = "quic"

    def __init__(self, conn: BoundedConnection, limits: Limits, *, is_client: bool, send: Callable,
                 peer_address: tuple, datagram_target: Callable[[], tuple[int, bool]],
                 loop: asyncio.AbstractEventLoop | None = None,
                 on_ready: Callable[["QuicLink"], None] | None = None,
                 on_terminated: Callable[["QuicLink"], None] | None = None,
                 on_cid_issued: Callable[[bytes], None] | None = None,
                 on_cid_retired: Callable[[bytes], None] | None = None,
                 on_handshake_done: Callable[[], None] | None = None) -> None:
        self._conn = conn
        self.limits = limits
        self._is_client = is_client
        self._send = send
        self._loop = loop or asyncio.get_running_loop()
        self.peer_address = peer_address
        self._datagram_target = datagram_target
        self._on_ready = on_ready
        self._on_terminated = on_terminated
        self._on_cid_issued = on_cid_issued
        self._on_cid_retired = on_cid_retired
        self._handshake_release = on_handshake_done
        now = self._loop.time()
        self._policy = LinkPolicy(limits, now)
        self._watermarks = SendWatermarks(limits)
        self._dispatch = Dispatcher(self._loop)
        self.bytes_sent = 0
        self.bytes_received = 0
        self._streams: dict[int, QuicLinkStream] = {}
        self._sending: set[QuicLinkStream] = set()
        self._rx_consumed = 0
        self._session_window = limits.session_window
        self._decoder = frames.FrameDecoder(max(limits.max_frame_size, limits.max_control_size))
        self._hello_sent = False
        self._version = 0
        self._peer_ready = False  # the peer's HELLO arrived
        self._held: list = []  # data-stream events that arrived before the peer's HELLO
        self._ready = asyncio.Event()  # QUIC handshake and HELLO exchange done
        self._closed = False  # no more I/O on the connection
        self._closing = False
        self._terminated = self._loop.create_future()
        #: The QUIC connection is up and we have not closed it (nor has the peer, as far as
        #: aioquic told us).
        self._quic_up = True
        self._tx_scheduled = False
        self._timer: asyncio.TimerHandle | None = None  # aioquic's timer
        self._timer_at: float | None = None
        self._policy_timer: asyncio.TimerHandle | None = None  # keepalive, half-close
        self._policy_at: float | None = None
        self._highest_peer_stream = 0
        #: Why the link closed (for logs), None while open.
        self.error: str | None = None
        self._tx_fed = 0  # stream bytes handed to aioquic (all streams, control included)
        self._close_pending: tuple[int, str] | None = None  # close waiting for control data
        self._close_timer: asyncio.TimerHandle | None = None
        self._dgram_probing = False  # a large size is in use but no large packet was acked yet
        #: How often this link fell back to a smaller datagram size (EMSGSIZE or a black hole).
        self.datagram_fallbacks = 0

    # --- Link API ------------------------------------------------------------------

    def set_handler(self, handler: LinkHandler) -> None:
        self._dispatch.set_handler(handler)
        self._schedule_transmit()

    def open_stream(self, metadata: bytes, handler: StreamHandler) -> LinkStream:
        if self._closed or self._closing or self._policy.going_away or not self._ready.is_set():
            raise SessionClosed("link is closing" if self._ready.is_set() else "link is not ready")
        metadata = bytes(metadata)
        if len(metadata) > self.limits.max_open_metadata:
            raise UsageError(f"OPEN metadata of {len(metadata)} bytes exceeds max_open_metadata")
        sid = self._conn.get_next_available_stream_id()
        header = frames.encode_frame(_OPEN, 0, 0, metadata)
        qs = self._conn.new_stream(sid)
        qs.sender.write(header)
        self._tx_fed += len(header)
        stream = QuicLinkStream(self, sid, metadata, qs, local=True)
        attach(qs, stream)
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
        if self._hello_sent and self._policy.send_goaway(code):
            self._send_frame(FrameType.GOAWAY, 0, frames.encode_goaway(self._highest_peer_stream, int(code), reason))
        self._check_drained()

    def close(self, code: int = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """Close now. Control frames already queued (a CONTROL error message, the GOAWAY this
        sends) reach the peer first: CONNECTION_CLOSE waits until the peer acknowledged them,
        at most ``CLOSE_FLUSH_TIMEOUT``. Streams are reset at once and ``link_closed`` follows
        at once either way."""
        self._close(int(code), reason, flush=True)

    async def wait_closed(self) -> None:
        await asyncio.shield(self._terminated)

    @property
    def is_closing(self) -> bool:
        return self._closed or self._closing or self._policy.going_away

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    @property
    def rtt(self) -> float | None:
        return self._policy.rtt

    @property
    def version(self) -> int:
        return self._version

    @property
    def ready(self) -> bool:
        """The QUIC handshake and the HELLO exchange are done and the link is not closed."""
        return self._ready.is_set() and not self._closed

    @property
    def datagram_size(self) -> int:
        """The largest UDP payload this side sends on the link now."""
        return self._conn.datagram_size

    async def wait_ready(self) -> None:
        """Return once the QUIC handshake and the HELLO exchange are done; raise ``LinkError``
        via the caller's timeout if the link ends first (see ``connect_quic``)."""
        await self._ready.wait()

    # --- closing -------------------------------------------------------------------

    def _close(self, code: int, reason: str, flush: bool) -> None:
        if self._closed:
            if self._close_pending is not None and not flush:
                self._close_flushed()
            return
        self._closing = True
        if self._hello_sent and self._policy.send_goaway(code):
            self._send_frame(FrameType.GOAWAY, 0, frames.encode_goaway(self._highest_peer_stream, code, reason))
        if flush and self._control_unacked():
            for sid in list(self._streams):  # stop their data now; the control stream goes on
                self._reset_quic_stream(sid, code, stop=True)
            self._close_pending = (code, reason)
            self._close_timer = self._loop.call_later(CLOSE_FLUSH_TIMEOUT, self._close_flushed)
        else:
            self._close_connection(code, reason)
        self._shutdown(code, reason)
        self._schedule_transmit()

    def _fail(self, code: int, reason: str) -> None:
        """The peer broke a rule (or a timer fired): close with ``code``."""
        if not self._closed:
            self._close(int(code), reason, flush=True)

    def _control_unacked(self) -> bool:
        """True while control-stream bytes we sent are not all acknowledged (and the QUIC
        connection is up to carry them)."""
        if not self._ready.is_set() and not self._hello_sent:
            return False
        cs = self._conn.stream(CONTROL_STREAM_ID)
        return self._quic_up and cs is not None and unacked(cs)

    def _close_flushed(self) -> None:
        """The deferred CONNECTION_CLOSE: control data acknowledged, or its time is up."""
        if self._close_pending is None:
            return
        code, reason = self._close_pending
        self._close_pending = None
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        self._close_connection(code, reason)
        self._schedule_transmit()

    def _close_connection(self, code: int, reason: str) -> None:
        """CONNECTION_CLOSE, once (aioquic ignores it on a connection already closing)."""
        if self._quic_up:
            self._quic_up = False
            self._conn.close(error_code=code, reason_phrase=reason[:1024])

    def _check_drained(self) -> None:
        if not self._closed and self._policy.drained(len(self._streams)):
            self._close(ErrorCode.NO_ERROR, "drained", flush=True)

    def _shutdown(self, code: int, reason: str) -> None:
        """Mark the link closed; reset every stream; tell the handler (once), from the loop."""
        if self._closed:
            return
        self._closed = True
        self._closing = True
        self.error = reason
        self._cancel_policy_timer()
        callback, self._handshake_release = self._handshake_release, None
        if callback is not None:
            callback()  # the handshake slot, if authentication never finished
        streams = list(self._streams.values())
        self._streams.clear()
        self._sending.clear()
        self._watermarks.clear()
        self._policy.clear()
        self._loop.call_soon(self._tell_closed, streams, code, reason)

    def _tell_closed(self, streams: list, code: int, reason: str) -> None:
        dispatch = self._dispatch
        if dispatch.holding:
            dispatch.hold(self._tell_closed, streams, code, reason)
            return
        for stream in streams:
            if not stream._closed:
                stream._reset = True
                stream._queue.clear()
                if stream.handler is not None:
                    dispatch.stream_done(stream, stream.handler.reset_received, code or ErrorCode.CONNECTION_RESET)
                stream._finish(True)
        dispatch.closed(code, reason)

    def _terminate(self) -> None:
        self._quic_up = False
        self._close_pending = None
        for handle in (self._timer, self._close_timer):
            if handle is not None:
                handle.cancel()
        self._timer = self._close_timer = None
        self._cancel_policy_timer()
        callback, self._on_terminated = self._on_terminated, None
        if callback is not None:
            callback(self)
        if not self._terminated.done():
            self._terminated.set_result(None)

    # --- datagram size -------------------------------------------------------------

    def _apply_datagram_size(self) -> None:
        """After the handshake: move to the path's datagram size (never above what the peer
        announced it receives). Until the peer acknowledges one large packet the size is on
        probation: two probe timeouts in a row without an ACK fall back to 1452."""
        conn = self._conn
        target, forced = self._datagram_target()
        peer = conn.peer_max_udp
        if peer is not None:
            target = min(target, peer)
        elif not self._is_client and not forced:
            target = MAX_DATAGRAM_SIZE  # a peer that announces nothing is not ours: standard size
        target = max(SMALLEST_MAX_DATAGRAM_SIZE, target)
        if target == conn.datagram_size:
            return
        conn.set_datagram_size(target)
        if target > MAX_DATAGRAM_SIZE:
            self._dgram_probing = True
            conn.watch_acks_above(MAX_DATAGRAM_SIZE, self._end_probation)

    def _end_probation(self) -> None:
        self._dgram_probing = False

    def datagram_too_big(self, why: str) -> None:
        """The path does not carry our datagrams: standard size from now on (and QUIC's
        minimum, 1200, if even 1452 is refused, as on a narrow IPv6 tunnel with DF set)."""
        conn = self._conn
        current = conn.datagram_size
        if current > MAX_DATAGRAM_SIZE:
            size = MAX_DATAGRAM_SIZE
        elif current > SMALLEST_MAX_DATAGRAM_SIZE:
            size = SMALLEST_MAX_DATAGRAM_SIZE
        else:
            return
        self._dgram_probing = False
        conn.stop_watching_acks()
        conn.set_datagram_size(size)
        self.datagram_fallbacks += 1
        log.info("QUIC link to %s: %s, datagrams down to %d bytes", self.peer_address, why, size)

    # --- I/O entry points ----------------------------------------------------------

    def datagram_received(self, data: bytes, addr) -> None:
        conn = self._conn
        if self._terminated.done():
            return
        now = self._loop.time()
        self._policy.last_received = now
        conn.receive_datagram(data, addr, now)
        self._process_events()
        self._schedule_transmit()

    def connection_lost(self, exc) -> None:
        """The UDP socket is gone: the link is over."""
        if not self._closed:
            self._shutdown(ErrorCode.CONNECTION_RESET, f"socket closed: {exc}" if exc else "socket closed")
        self._terminate()

    def unreachable(self, exc: Exception) -> None:
        """ICMP port unreachable before the link is up: nobody listens on UDP there, fail
        fast (``auto://`` then falls back to WSS). Later, QUIC's own timers decide."""
        if not self._ready.is_set() and not self._closed:
            self._fail(ErrorCode.CONNECT_FAILED, f"UDP unreachable: {exc}")

    def start(self, addr) -> None:
        """Client side: send the first flight towards ``addr``."""
        self._conn.connect(addr, now=self._loop.time())
        self._transmit()

    # --- sending -------------------------------------------------------------------

    def _send_frame(self, ftype: int, flags: int, payload: bytes) -> None:
        frame = frames.encode_frame(int(ftype), flags, 0, payload)
        self._conn.send_stream_data(CONTROL_STREAM_ID, frame)
        self._tx_fed += len(frame)
        self._schedule_transmit()

    def _send_reply(self, ftype: int, flags: int, payload: bytes) -> None:
        """A control frame the peer's input asked for: a peer that makes us queue many
        without reading them (its control stream's credit never comes back) floods us."""
        cs = self._conn.stream(CONTROL_STREAM_ID)
        queued = written_offset(cs) - acked_offset(cs) if cs is not None else 0
        check_reply_backlog(queued + HEADER_SIZE + len(payload))
        self._send_frame(ftype, flags, payload)

    def _reset_quic_stream(self, stream_id: int, code: int, stop: bool) -> None:
        conn = self._conn
        calls = (conn.reset_stream, conn.stop_stream) if stop else (conn.reset_stream,)
        for call in calls:
            try:
                call(stream_id, code)
            except Exception:  # that direction is already over
                pass
        self._schedule_transmit()

    def _want_send(self, stream: QuicLinkStream) -> None:
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
                    if not s.buffered and not s._eof_pending:
                        sending.discard(s)
            now = loop_time()
            datagrams = conn.datagrams_to_send(now=now)
            if not datagrams:
                break
            if send(datagrams):
                self.datagram_too_big("EMSGSIZE: datagram larger than the path MTU")
            if not sending:
                break  # aioquic had everything there was to send: no need to ask again
        if self._close_pending is not None and not self._control_unacked():
            self._close_flushed()
        # Callbacks after the batch: resumed writers, finished streams.
        if fed_any:
            for s in fed_any:
                if not s._closed:
                    s._after_feed()
        for s in self._watermarks.drained():
            if not s._closed and s.handler is not None:
                self._dispatch.stream_call(s, s.handler.writable)
        self._process_events()
        timer_at = conn.get_timer()
        if timer_at is not None and timer_at <= now:
            # aioquic did what was due at ``now`` and still names ``now`` (an ACK held back
            # by pacing): only a later clock changes its mind, so do not spin until then.
            timer_at = now + TIMER_GRANULARITY
        if self._timer is not None and self._timer_at != timer_at:
            self._timer.cancel()
            self._timer = None
        if self._timer is None and timer_at is not None:
            self._timer = self._loop.call_at(timer_at, self._on_timer)
        self._timer_at = timer_at
        self._arm_policy_timer()

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        conn = self._conn
        conn.handle_timer(now=self._loop.time())
        if self._dgram_probing and conn.probe_timeouts >= 2:
            self.datagram_too_big("no acknowledgement of large datagrams")
        self._process_events()
        self._transmit()

    # --- the link's policy on the loop's clock --------------------------------------

    def _arm_policy_timer(self) -> None:
        if self._closed or not self._hello_sent:
            return
        at = self._policy.next_deadline()
        # Keep an earlier timer: it fires, finds nothing due and re-arms.
        if self._policy_timer is not None and self._policy_at <= at:
            return
        self._cancel_policy_timer()
        self._policy_at = at
        self._policy_timer = self._loop.call_at(at + 0.001, self._on_policy_timer)

    def _cancel_policy_timer(self) -> None:
        if self._policy_timer is not None:
            self._policy_timer.cancel()
            self._policy_timer = None
            self._policy_at = None

    def _on_policy_timer(self) -> None:
        self._policy_timer = None
        self._policy_at = None
        if self._closed:
            return
        policy = self._policy
        now = self._loop.time()
        due = policy.keepalive_due(now)
        if due == KEEPALIVE_TIMEOUT:
            self._fail(ErrorCode.TIMEOUT, "keepalive timeout: no packets from the peer")
            return
        if due == KEEPALIVE_PING:
            # Our PING rides the control stream, which waits with the data for connection
            # credit while a reader is slow: then QUIC's own PING (never flow-controlled) alone
            # keeps the peer hearing from us and restarts its idle timer, and our PINGs do not
            # pile up to reach the peer in one burst (a PING flood) once credit returns.
            cs = self._conn.stream(CONTROL_STREAM_ID)
            if cs is None or not unsent_bytes(cs):
                self._send_frame(FrameType.PING, 0, policy.new_ping(now))
            self._conn.send_ping(0)
            self._schedule_transmit()
        for stream in policy.half_closed_streams:
            acked = acked_offset(stream._qs)
            if acked != stream._acked_mark:  # the peer took more of our data: progress too
                stream._acked_mark = acked
                stream.last_activity = now
        for stream in policy.expired_half_closed(now):
            if not stream._closed:
                stream._half_closed = False
                stream._abort(ErrorCode.TIMEOUT, notify=True)
        self._arm_policy_timer()

    def _enter_half_closed(self, stream: QuicLinkStream) -> None:
        stream._half_closed = True
        self._policy.half_closed(stream, self._loop.time())
        self._arm_policy_timer()

    # --- events --------------------------------------------------------------------

    def _process_events(self) -> None:
        conn = self._conn
        dispatch = self._dispatch
        while True:
            event = conn.next_event()
            if event is None:
                return
            cls = type(event)
            if cls is qe.StreamDataReceived or cls is qe.StreamReset or cls is qe.StopSendingReceived:
                if event.stream_id == CONTROL_STREAM_ID:
                    if cls is qe.StreamDataReceived:
                        self._control_data(event)
                    else:
                        self._fail(ErrorCode.PROTOCOL_ERROR, "control stream reset")
                elif not self._peer_ready:
                    self._held.append(event)
                elif dispatch.holding:
                    dispatch.hold(self._stream_event, event)
                else:
                    self._stream_event(event)
            elif cls is qe.HandshakeCompleted:
                self._handshake_completed(event)
            elif cls is qe.ConnectionTerminated:
                if not self._closed:
                    self._shutdown(_close_code(event), event.reason_phrase or "connection closed")
                self._terminate()
            elif cls is qe.ConnectionIdIssued:
                if self._on_cid_issued is not None:
                    self._on_cid_issued(event.connection_id)
            elif cls is qe.ConnectionIdRetired:
                if self._on_cid_retired is not None:
                    self._on_cid_retired(event.connection_id)

    def _handshake_completed(self, event) -> None:
        if event.alpn_protocol != QUIC_ALPN:
            self._fail(ErrorCode.PROTOCOL_ERROR, "ALPN tunnel/1 not negotiated")
            return
        self._apply_datagram_size()
        if self._is_client:
            self._send_hello()

    def _send_hello(self) -> None:
        if self._hello_sent:
            return
        self._hello_sent = True
        self._policy.last_received = self._loop.time()
        self._send_frame(FrameType.HELLO, 0, hello_payload(self.limits))
        self._arm_policy_timer()

    def _control_data(self, event) -> None:
        if self._closed:
            return
        data = event.data
        cs = self._conn.stream(CONTROL_STREAM_ID)
        # Control bytes are parsed at once: their credit goes straight back.
        if cs is not None and data:
            self._rx_consumed += len(data)
            self._conn.grant_stream(cs, received_offset(cs), self.limits.initial_stream_window)
            self._conn.grant_connection(self._rx_consumed, self._session_window)
        if not self._is_client and not self._hello_sent:
            self._send_hello()
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
        policy = self._policy
        if not self._peer_ready:
            if ftype != FrameType.HELLO:
                raise ProtocolError("first frame is not HELLO")
            self._version = accept_hello(payload).version
            self._peer_ready = True
            held, self._held = self._held, []
            for event in held:
                if self._dispatch.holding:
                    self._dispatch.hold(self._stream_event, event)
                else:
                    self._stream_event(event)
            if not self._ready.is_set():
                self._ready.set()
                if self._on_ready is not None:
                    self._on_ready(self)
            return
        now = self._loop.time()
        if ftype == FrameType.PING:
            answer, _rtt = policy.ping_frame(flags, payload, now)
            if answer is not None:
                self._send_reply(FrameType.PING, Flags.ACK, answer)
        elif ftype == FrameType.CONTROL:
            message = policy.control_frame(payload, now)
            if self._dispatch.holding:
                self._dispatch.hold(self._dispatch.control, message)
            else:
                self._dispatch.control(message)
        elif ftype == FrameType.GOAWAY:
            last, code, reason, close_now = policy.goaway_frame(payload)
            log.info("peer sent GOAWAY (code %s): %s", code, reason)
            if close_now:
                self._close(code, reason or "peer sent GOAWAY", flush=False)
                return
            for stream in [s for s in self._streams.values() if s._local and s.stream_id > last]:
                stream._abort(ErrorCode.REFUSED, notify=True)  # never processed by the peer
            self._check_drained()
        elif ftype == FrameType.HELLO:
            raise ProtocolError("second HELLO")
        else:
            raise ProtocolError(f"{FrameType(ftype).name} frame on the QUIC control stream")

    def _stream_event(self, event) -> None:
        if self._closed:
            return
        try:
            self._stream_event_checked(event)
        except ProtocolError as exc:  # a flood
            self._fail(exc.code, str(exc))
            return
        self.relieve_starved()

    def relieve_starved(self) -> None:
        """When the peer has (nearly) no connection credit left, grant some beyond the window
        to a stream that reads (it consumed all it received), else room for one more OPEN:
        streams whose receivers never read must not stall the others."""
        conn = self._conn
        window = self._session_window
        if self._closed or not conn.overdraft_due(self._rx_consumed, window):
            return
        for stream in self._streams.values():
            qs = stream._qs
            received = received_offset(qs)
            if stream._reset or stream._closed or stream._eof_received or stream._rx_consumed < received:
                continue
            if conn.grant_overdraft(self._rx_consumed, window, granted_offset(qs) - received):
                self._schedule_transmit()
                return
        if conn.grant_overdraft(self._rx_consumed, window, HEADER_SIZE + self.limits.max_open_metadata):
            self._schedule_transmit()

    def _stream_event_checked(self, event) -> None:
        sid = event.stream_id
        qs = self._conn.stream(sid)
        if qs is None:  # aioquic already forgot it
            return
        state = attachment(qs)
        now = self._loop.time()
        if type(event) is not qe.StreamDataReceived:
            # Churn: a peer stream first seen reset counts as its open and its reset; a live
            # stream's reset counts once; the answer to our own reset is not the peer's churn.
            if state is None:
                self._highest_peer_stream = max(self._highest_peer_stream, sid)
                self._policy.count_churn(now)
                self._policy.count_churn(now)
            elif type(event) is qe.StreamReset and (type(state) is _Incoming or (
                    type(state) is QuicLinkStream and not (state._reset or state._closed))):
                self._policy.count_churn(now)
            code = _stream_code(event.error_code)
            if type(state) is QuicLinkStream:
                if not state._reset and not state._closed:
                    state._abort(code, notify=True)
            elif type(state) is not _Refused:
                self._refuse(qs, code)
            return
        if type(state) is QuicLinkStream:
            if state._closed:
                state._release_rest()
            else:
                state._data(event.data, event.end_stream)
            return
        if type(state) is _Refused:
            self._credit_refused(qs, state)
            return
        # A stream the peer opened: collect its OPEN frame.
        if state is None:
            self._policy.count_churn(now)
            state = _Incoming()
            attach(qs, state)
            self._highest_peer_stream = max(self._highest_peer_stream, sid)
        buf = state.buf
        buf += event.data
        complete = False
        bad = False
        if len(buf) >= HEADER_SIZE:
            ftype, flags, reserved, fsid, length = _HEADER.unpack_from(buf, 0)
            bad = ftype != _OPEN or reserved or fsid or flags & ~_FIN or length > self.limits.max_open_metadata
            complete = len(buf) >= HEADER_SIZE + length
        if bad or (not complete and event.end_stream):
            self._refuse(qs, ErrorCode.PROTOCOL_ERROR)
            return
        if not complete:
            return
        refusal = ErrorCode.REFUSED if self._closing else self._policy.admit_peer_stream()
        if refusal is not None:
            self._refuse(qs, refusal)
            return
        stream = QuicLinkStream(self, sid, bytes(buf[HEADER_SIZE:HEADER_SIZE + length]), qs, local=False)
        attach(qs, stream)
        use_chunk_sender(qs)
        stream._rx_seen = HEADER_SIZE + length
        stream._skip(HEADER_SIZE + length)
        rest = bytes(buf[HEADER_SIZE + length:])
        self._streams[sid] = stream
        stream.handler = self._dispatch.open(stream)
        if stream._reset or stream._closed or stream.handler is None:
            return
        stream._data(rest, event.end_stream or bool(flags & _FIN))

    def _refuse(self, qs, code: int) -> None:
        """Reset a peer stream that never became a :class:`QuicLinkStream`."""
        state = _Refused()
        attach(qs, state)
        self._credit_refused(qs, state)
        self._reset_quic_stream(qs.stream_id, code, stop=True)

    def _credit_refused(self, qs, state: _Refused) -> None:
        """Whatever a refused stream received is consumed at once."""
        received = received_offset(qs)
        self._rx_consumed += received - state.credited
        state.credited = received
        self._conn.grant_connection(self._rx_consumed, self._session_window)
