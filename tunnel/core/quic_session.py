"""The sans-IO QUIC session: the core's frames over one QUIC connection (docs/PROTOCOL.md,
"QUIC mapping").

The link's rules are applied once, by :class:`tunnel.core.session.Session`, on both carriers.
Over WSS its frames travel as one byte stream; here this module moves the same frames over a
QUIC connection so that loss on one tunneled stream does not stall the others:

- *out* (:meth:`QuicSession.send_frames`, fed what ``Session.data_to_send`` returned): DATA goes
  to the tunneled stream's own QUIC stream (its FIN is QUIC's FIN); OPEN becomes the first bytes
  of a new QUIC stream; every other frame (HELLO, WINDOW_UPDATE, RESET, PING, GOAWAY, CONTROL)
  rides the control stream, QUIC stream 0;
- *in* (:meth:`QuicSession.receive_datagram`, then :meth:`QuicSession.pop_frames` for
  ``Session.receive_data``): the control stream's frames, and for every other QUIC stream its
  OPEN frame and then its bytes as DATA frames, in the order the engine reports them.

Stream numbers: the core numbers streams its own way (the agent's odd, the relay's even, in the
order they are opened). Our own streams map one to one onto QUIC streams in opening order; the
peer's get the core's numbers in the order their OPEN frames complete, which QUIC does not
promise to be the order they were opened in. On the wire (WINDOW_UPDATE, RESET, GOAWAY) a
tunneled stream is named by the number its opener gave it, computed from its QUIC stream ID
(:func:`_wire_name`).

Flow control is the core's: per-stream and link windows, moved by WINDOW_UPDATE frames, so
what a link holds follows what the application consumed, as on WSS. QUIC's own windows are
sized above them and only back them up. A reset ends each direction with QUIC's RESET_STREAM
(nothing more is sent or resent) and our RESET frame on the control stream, whose payload adds
the direction's final size to the error code: the receiver gives back the link credit of what
the sender counted and QUIC never delivered (:meth:`QuicSession.pop_discarded`), so both sides'
link windows stay exact. (The engine's own reset event carries no final size.)

The QUIC connection is driven through the engine's public API only (aioquic's
``QuicConnection``, or a connection with the same API): ``connect``, ``receive_datagram``,
``datagrams_to_send``, ``get_timer``, ``handle_timer``, ``next_event``,
``get_next_available_stream_id``, ``send_stream_data``, ``send_ping`` and ``close``, and its
events. No clock: every time is the ``now`` the caller passes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from tunnel import codec as frames
from tunnel.core.session_state import Role
from tunnel.wire.constants import HEADER_SIZE, ErrorCode, Flags, FrameType
from tunnel.wire.errors import ProtocolError

__all__ = [
    "CLOSE_FLUSH_TIMEOUT",
    "CONTROL_STREAM_ID",
    "ConnectionIdIssued",
    "ConnectionIdRetired",
    "HandshakeCompleted",
    "QuicClosed",
    "QuicSession",
]

CONTROL_STREAM_ID = 0
#: After ``close``: how long the control stream's last frames (a CONTROL error message, the
#: GOAWAY) may take to be acknowledged before CONNECTION_CLOSE goes anyway (seconds).
CLOSE_FLUSH_TIMEOUT = 1.0
#: How much later than now the engine's timer is armed when it names a time already past.
TIMER_GRANULARITY = 0.001
#: Most of the peer's streams reset before their OPEN arrived that are remembered; a peer that
#: needs more is broken.
MAX_EARLY_RESETS = 1024

_HEADER = struct.Struct("!BBHII")
_RESET_PAYLOAD = struct.Struct("!IQ")  # error code, final size
_DATA = int(FrameType.DATA)
_OPEN = int(FrameType.OPEN)
_RESET = int(FrameType.RESET)
_WINDOW_UPDATE = int(FrameType.WINDOW_UPDATE)
_PING = int(FrameType.PING)
_GOAWAY = int(FrameType.GOAWAY)
_FIN = int(Flags.FIN)
_ACK = int(Flags.ACK)


@dataclass(slots=True)
class HandshakeCompleted:
    """The QUIC handshake is done (the ALPN was checked)."""


@dataclass(slots=True)
class ConnectionIdIssued:
    connection_id: bytes


@dataclass(slots=True)
class ConnectionIdRetired:
    connection_id: bytes


@dataclass(slots=True)
class QuicClosed:
    """The QUIC connection is over (``code`` in our error codes, for the link's report)."""

    code: int
    reason: str


class _Route:
    """One tunneled stream's QUIC stream. ``sid`` is None while the peer's OPEN is incomplete."""

    __slots__ = ("qid", "sid", "opening", "skip", "head", "sent", "received", "out_done", "in_done", "reset_sent",
                 "reset_told", "reset_code")

    def __init__(self, qid: int, sid: int | None) -> None:
        self.qid = qid
        self.sid = sid
        self.opening: bytearray | None = None if sid is not None else bytearray()
        self.skip = 0  # bytes of an OPEN too long to keep, still to come
        self.head = 0  # bytes of our OPEN frame at the start of the QUIC stream
        self.sent = 0  # stream bytes handed to the engine (after the OPEN frame)
        self.received = 0  # stream bytes handed to the core
        self.out_done = False  # our direction ended: FIN or reset
        self.in_done = False  # the peer's direction ended: FIN, or its RESET frame came
        self.reset_sent = False  # our RESET frame went
        self.reset_told = False  # the core heard of the peer's reset
        self.reset_code = ErrorCode.CONNECTION_RESET  # the peer's, when it came before the OPEN


class QuicSession:
    """Frames of one link over one QUIC connection (see the module docstring).

    ``connection`` is the engine's connection object, ``events`` the engine's events module,
    ``sent_offset(stream_id)`` how far the engine has sent a stream (None: not known);
    ``max_streams`` how many streams the peer may open at once.
    ``role`` is the core session's (the agent's streams are odd); ``connection`` says which
    side of QUIC this is.
    """

    def __init__(self, connection, events, *, role: Role, alpn: str, max_frame_size: int,
                 max_control_size: int, max_open_metadata: int, max_streams: int, sent_offset) -> None:
        self._conn = connection
        self._ev = events
        self._sent_offset = sent_offset
        self._alpn = alpn
        self._is_client = bool(connection.configuration.is_client)
        self._max_frame = max_frame_size
        self._max_open = max_open_metadata
        self._max_routes = 2 * max_streams
        self._decoder = frames.FrameDecoder(max(max_frame_size, max_control_size))
        self._first_local_sid = 1 if role == Role.AGENT else 2
        self._next_peer_sid = 2 if role == Role.AGENT else 1
        self._peer_floor = 1 if self._is_client else 4  # every peer QUIC stream below was seen
        self._peer_seen: set[int] = set()  # peer QUIC streams seen at or above the floor
        self._max_peer_qid = 0  # highest peer QUIC stream whose OPEN completed (for GOAWAY)
        self._routes: dict[int, _Route] = {}  # QUIC stream id -> route, while either way is open
        self._peer_routes = 0  # of which the peer's streams
        self._peer_qid: dict[int, int] = {}  # core id -> QUIC stream id, the peer's streams
        self._early_resets: dict[int, int] = {}  # peer QUIC stream -> code, reset before its OPEN came
        self._discarded = 0  # link credit of bytes QUIC discarded (resets), for the core
        self._control_stream = self._is_client  # the server may write once the client opened it
        self._control_out: list = []
        self._control_written = 0  # bytes handed to the engine on the control stream
        self._unsent_routes: set = set()  # tunneled streams the engine may hold unsent bytes of
        self._in: list = []  # frames for Session.receive_data
        self._goaway_in: list = []  # the peer's GOAWAY, held until the datagram's streams are read
        self._events: list = []
        self._ping_uid = 0
        self._close_code: int | None = None  # from our GOAWAY: the CONNECTION_CLOSE's code
        self._close_reason = ""
        self._closing_at: float | None = None  # CONNECTION_CLOSE once acknowledged, or then
        self._close_ping: int | None = None
        self.handshake_complete = False
        self.closed = False  # CONNECTION_CLOSE sent or received: no more I/O on the streams
        self.terminated = False  # the engine is done with the connection

    @property
    def connection(self):
        """The engine's connection (for diagnostics and tests: the session drives it)."""
        return self._conn

    @property
    def datagram_size(self) -> int:
        """The largest UDP payload the connection builds."""
        return self._conn.configuration.max_datagram_size

    @property
    def host_cid(self) -> bytes:
        """The connection ID the peer addresses us by first."""
        return self._conn.host_cid

    # --- input -------------------------------------------------------------------------

    def connect(self, addr, now: float) -> None:
        """Client: send the first flight towards ``addr``."""
        self._conn.connect(addr, now=now)

    def receive_datagram(self, data, addr, now: float) -> None:
        """Feed one UDP datagram; then read :meth:`pop_frames` and :meth:`pop_events`."""
        if not self.terminated:
            self._conn.receive_datagram(data, addr, now)
            self._process(now)

    def handle_timer(self, now: float) -> None:
        """Run what is due at ``now`` (the engine's timers, the close flush's deadline)."""
        if self.terminated:
            return
        if self._closing_at is not None and now >= self._closing_at:
            self._close_now()
        else:
            self._conn.handle_timer(now=now)
        self._process(now)

    def send_frames(self, buffers) -> None:
        """Route the frames ``Session.data_to_send`` returned (headers and payload slices, a
        control frame always whole) onto QUIC streams."""
        if self.closed:
            return
        i = 0
        n = len(buffers)
        while i < n:
            head = buffers[i]
            i += 1
            ftype, flags, _, sid, length = _HEADER.unpack_from(head, 0)
            if ftype != _DATA:
                self._route_out(ftype, flags, sid, head)
                continue
            # DATA: the payload follows the header, in slices of the application's buffers.
            if len(head) > HEADER_SIZE:
                parts = [memoryview(head)[HEADER_SIZE:]]
                got = len(head) - HEADER_SIZE
            else:
                parts = []
                got = 0
            while got < length:
                part = buffers[i]
                i += 1
                parts.append(part)
                got += len(part)
            self._send_data(sid, parts, bool(flags & _FIN))
        self._flush_control()

    def close(self, code: int, reason: str, now: float) -> None:
        """Close the connection: once the control stream's last frames are sent and a QUIC
        PING sent after them is acknowledged, at most :data:`CLOSE_FLUSH_TIMEOUT` later."""
        if self.closed:
            return
        if code is not None and self._close_code is None:
            self._close_code, self._close_reason = code, reason
        if self.handshake_complete:
            if self._closing_at is None:
                self._closing_at = now + CLOSE_FLUSH_TIMEOUT
        else:
            self._close_now()
            self._process(now)

    def abort(self, code: int, reason: str) -> None:
        """CONNECTION_CLOSE at once."""
        if not self.closed:
            self._close_code, self._close_reason = code, reason
            self._close_now()

    # --- output ------------------------------------------------------------------------

    def pop_frames(self) -> bytes:
        """The bytes for ``Session.receive_data`` (frames, whole) since the last call."""
        if not self._in:
            return b""
        data = self._in[0] if len(self._in) == 1 else b"".join(self._in)
        self._in = []
        return data

    def pop_discarded(self) -> int:
        """Stream bytes the peer counted against the link window that a reset discarded
        before they reached the core (``Session.credit_discarded``), since the last call."""
        n, self._discarded = self._discarded, 0
        return n

    def pop_events(self) -> list:
        events = self._events
        self._events = []
        return events

    def datagrams_to_send(self, now: float) -> list:
        """``[(datagram, addr), ...]`` to send now."""
        if self.terminated:
            return []
        conn = self._conn
        datagrams = conn.datagrams_to_send(now=now)
        if self._closing_at is not None and self._close_ping is None and not self.closed \
                and self.control_backlog() <= 0:
            # Closing, and the control stream's last bytes are out: the PING goes after them.
            self._ping_uid += 1
            self._close_ping = self._ping_uid
            conn.send_ping(self._close_ping)
            datagrams += conn.datagrams_to_send(now=now)
        self._process(now)  # a connection that just closed itself says so only here
        return datagrams

    def control_backlog(self) -> int:
        """Control-stream bytes handed to the engine and not sent yet: they pile up when the
        peer does not read them (it gives no credit back) or acknowledges nothing."""
        sent = self._sent_offset(CONTROL_STREAM_ID)
        return 0 if sent is None else self._control_written - sent

    def unsent(self) -> int:
        """Bytes of the tunneled streams handed to the engine and not sent yet. The link keeps
        them few: the rest waits, uncopied, in the session's queues (aioquic's send buffer is
        one ``bytearray`` per stream, which costs a copy of what it holds as it grows)."""
        total = 0
        for route in list(self._unsent_routes):
            sent = self._sent_offset(route.qid)
            left = 0 if sent is None else route.head + route.sent - sent
            if left > 0:
                total += left
            else:
                self._unsent_routes.discard(route)
        return total

    def next_timer(self, now: float) -> float | None:
        """When :meth:`handle_timer` should run next (None: no timer)."""
        if self.terminated:
            return None
        at = self._conn.get_timer()
        if self._closing_at is not None and (at is None or self._closing_at < at):
            at = self._closing_at
        if at is not None and at <= now:
            # The engine did what was due at ``now`` and still names ``now`` (an ACK held
            # back by pacing): only a later clock changes its mind, so do not spin until then.
            at = now + TIMER_GRANULARITY
        return at

    # --- the engine's events -----------------------------------------------------------

    def _process(self, now: float) -> None:
        ev = self._ev
        conn = self._conn
        while True:
            event = conn.next_event()
            if event is None:
                if self._goaway_in:
                    # After the OPENs that came in the same datagram: the peer sent them first
                    # (its control stream's frames come first in a packet), as WSS keeps them.
                    self._in += self._goaway_in
                    self._goaway_in = []
                # Control frames the peer's input made us queue (our RESET frames answering
                # its resets) go now: the core may have nothing to write that would carry them.
                self._flush_control()
                return
            kind = type(event)
            if kind is ev.StreamDataReceived:
                if not self.closed:
                    self._stream_data(event.stream_id, event.data, event.end_stream)
            elif kind is ev.StreamReset or kind is ev.StopSendingReceived:
                if not self.closed:
                    self._stream_reset(event.stream_id, event.error_code)
            elif kind is ev.HandshakeCompleted:
                if event.alpn_protocol != self._alpn:
                    self._violation(ErrorCode.PROTOCOL_ERROR, f"ALPN {self._alpn} not negotiated")
                else:
                    self.handshake_complete = True
                    self._events.append(HandshakeCompleted())
            elif kind is ev.PingAcknowledged:
                if event.uid == self._close_ping:
                    self._close_now()
            elif kind is ev.ConnectionTerminated:
                self.closed = self.terminated = True
                self._events.append(QuicClosed(_close_code(event), event.reason_phrase or "connection closed"))
            elif kind is ev.ConnectionIdIssued:
                self._events.append(ConnectionIdIssued(event.connection_id))
            elif kind is ev.ConnectionIdRetired:
                self._events.append(ConnectionIdRetired(event.connection_id))

    def _violation(self, code: int, reason: str) -> None:
        """The peer broke the mapping's rules: the link is over."""
        if not self.closed:
            self.abort(int(code), reason)

    def _close_now(self) -> None:
        self._closing_at = None
        self._close_ping = None
        if not self.closed:
            self.closed = True
            code = ErrorCode.NO_ERROR if self._close_code is None else self._close_code
            self._conn.close(error_code=int(code), reason_phrase=self._close_reason)

    # --- in: QUIC streams to frames ----------------------------------------------------

    def _is_local(self, qid: int) -> bool:
        return (qid & 1) == (0 if self._is_client else 1)

    def _stream_data(self, qid: int, data, end: bool) -> None:
        if qid == CONTROL_STREAM_ID:
            self._control_data(data, end)
            return
        route = self._routes.get(qid) or self._new_peer_route(qid)
        if route is None:
            return  # a late frame of a stream both sides are done with
        if route.sid is None:
            if route.opening is not None:
                self._collect_open(route, data, end)
            return
        if route.in_done:
            return  # reset
        if route.skip:
            cut = min(route.skip, len(data))
            route.skip -= cut
            data = data[cut:]
        self._deliver(route, data, end)
        if end:
            route.in_done = True
            self._maybe_forget(route)

    def _new_peer_route(self, qid: int) -> _Route | None:
        """The route of a peer QUIC stream seen for the first time (None: not one)."""
        if qid & 2:  # unidirectional: we could never answer on it
            self._violation(ErrorCode.PROTOCOL_ERROR, f"unidirectional QUIC stream {qid}")
            return None
        if self._is_local(qid) or not self._first_seen(qid):
            return None
        if self._peer_routes >= self._max_routes:
            # Streams whose ends never settle (reset, and no RESET frame follows): a broken peer.
            self._violation(ErrorCode.PROTOCOL_ERROR, "too many streams left unsettled")
            return None
        route = self._routes[qid] = _Route(qid, None)
        self._peer_routes += 1
        code = self._early_resets.pop(qid, None)
        if code is not None:  # its RESET frame overtook it (and settled the credit)
            route.in_done = True
            route.reset_code = code
            self._reset_ours(route, code)
        return route

    def _first_seen(self, qid: int) -> bool:
        """True the first time the peer's QUIC stream ``qid`` shows up."""
        if qid < self._peer_floor or qid in self._peer_seen:
            return False
        if qid == self._peer_floor:
            self._peer_floor += 4
            while self._peer_floor in self._peer_seen:
                self._peer_seen.discard(self._peer_floor)
                self._peer_floor += 4
        else:
            if len(self._peer_seen) >= self._max_routes:
                # An honest peer's gaps fill within a round trip or so; one that never fills
                # would make this set grow with every stream opened above it.
                self._violation(ErrorCode.PROTOCOL_ERROR,
                                f"QUIC streams opened above stream {self._peer_floor}, which never came")
                return False
            self._peer_seen.add(qid)
        return True

    def _collect_open(self, route: _Route, data, end: bool) -> None:
        buf = route.opening
        buf += data
        if len(buf) < HEADER_SIZE:
            if end:
                self._violation(ErrorCode.PROTOCOL_ERROR, "stream ended before its OPEN frame")
            return
        ftype, flags, reserved, fsid, length = _HEADER.unpack_from(buf, 0)
        if ftype != _OPEN or reserved or fsid or flags & ~_FIN:
            self._violation(ErrorCode.PROTOCOL_ERROR, "a QUIC stream does not start with an OPEN frame")
            return
        end_of_open = HEADER_SIZE + length
        if length > self._max_open:
            # Not kept: the core refuses an OPEN this long, told by one of the same length.
            route.skip = max(0, end_of_open - len(buf))
            after = bytes(buf[end_of_open:])  # stream bytes that came with it: still the core's
            del buf[HEADER_SIZE:]
            buf += bytes(self._max_open + 1)
            end_of_open = len(buf)
            buf += after
        elif len(buf) < end_of_open:
            if end:
                self._violation(ErrorCode.PROTOCOL_ERROR, "stream ended inside its OPEN frame")
            return
        sid = route.sid = self._next_peer_sid
        self._next_peer_sid += 2
        self._peer_qid[sid] = route.qid
        if route.qid > self._max_peer_qid:
            self._max_peer_qid = route.qid
        route.opening = None
        rest = bytes(buf[end_of_open:])
        fin = end or bool(flags & _FIN)
        if route.in_done:  # reset already: the core counts the open and the reset, as on WSS
            self._in.append(frames.encode_frame(_OPEN, 0, sid, buf[HEADER_SIZE:end_of_open]))
            # Told here, not by _tell_reset: our reset went out as the answer to the peer's
            # (reset_sent), and the core must still hear of it or keep the stream open.
            route.reset_told = True
            self._in.append(frames.encode_frame(_RESET, 0, sid, frames.encode_u32(route.reset_code)))
            self._maybe_forget(route)
            return
        self._in.append(frames.encode_frame(_OPEN, _FIN if fin and not rest else 0, sid, buf[HEADER_SIZE:end_of_open]))
        if rest:
            self._deliver(route, rest, fin)
        if fin:
            route.in_done = True
            self._maybe_forget(route)

    def _deliver(self, route: _Route, data, end: bool) -> None:
        """``data`` as DATA frames of at most the core's frame size."""
        sid = route.sid
        n = len(data)
        route.received += n
        limit = self._max_frame
        out = self._in
        if n <= limit:
            out.append(frames.encode_header(_DATA, _FIN if end else 0, sid, n))
            if n:
                out.append(data)
            return
        view = memoryview(data)
        for start in range(0, n, limit):
            piece = view[start:start + limit]
            last = start + limit >= n
            out.append(frames.encode_header(_DATA, _FIN if end and last else 0, sid, len(piece)))
            out.append(piece)

    def _stream_reset(self, qid: int, code: int) -> None:
        """The engine's RESET_STREAM or STOP_SENDING: the stream is reset, and our direction
        ends too (the engine frees a stream only once both are done). The link credit is
        settled by the peer's RESET frame, which carries the final size."""
        if qid == CONTROL_STREAM_ID:
            self._violation(ErrorCode.PROTOCOL_ERROR, "control stream reset")
            return
        route = self._routes.get(qid) or self._new_peer_route(qid)
        if route is None:
            return
        self._tell_reset(route, _stream_code(code))
        route.opening = None  # an OPEN still incomplete will not come
        self._reset_ours(route, code)
        self._maybe_forget(route)

    def _control_data(self, data, end: bool) -> None:
        if not self._control_stream:
            self._control_stream = True
            self._flush_control()
        try:
            decoded = self._decoder.feed(data)
        except ProtocolError as exc:
            self._violation(exc.code, str(exc))
            return
        for ftype, flags, wire_id, payload in decoded:
            if ftype == _WINDOW_UPDATE and wire_id:
                sid = self._sid_of(_qid_named(wire_id))
                if sid is not None:
                    self._in.append(frames.encode_frame(ftype, flags, sid, payload))
            elif ftype == _RESET:
                self._control_reset(_qid_named(wire_id), payload)
            elif ftype == _GOAWAY:
                try:
                    last, code, reason = frames.parse_goaway(payload)
                except ProtocolError as exc:
                    self._violation(exc.code, str(exc))
                    return
                # ``last`` names one of our streams the wire's way, which is our own numbering.
                self._goaway_in.append(frames.encode_frame(ftype, flags, 0, frames.encode_goaway(
                    last if (last & 1) == (self._first_local_sid & 1) else 0, code, reason)))
            elif ftype == _DATA or ftype == _OPEN:
                self._violation(ErrorCode.PROTOCOL_ERROR, f"{FrameType(ftype).name} frame on the QUIC control stream")
                return
            else:
                self._in.append(frames.encode_frame(ftype, flags, wire_id, payload))
            if self.closed:
                return
        if end:
            self._violation(ErrorCode.PROTOCOL_ERROR, "control stream ended")

    def _control_reset(self, qid: int, payload) -> None:
        """The peer's RESET frame: the stream is reset and the peer's direction ended at the
        final size it names."""
        if len(payload) != _RESET_PAYLOAD.size:
            self._violation(ErrorCode.PROTOCOL_ERROR, f"RESET payload of {len(payload)} bytes on the QUIC control stream")
            return
        code, final = _RESET_PAYLOAD.unpack(payload)
        route = self._routes.get(qid)
        if route is None:
            if (qid == CONTROL_STREAM_ID or self._is_local(qid) or qid < self._peer_floor or qid in self._peer_seen
                    or qid in self._early_resets):
                return  # a stream both sides are done with, or reset already (or nonsense: ignored, as on WSS)
            if len(self._early_resets) >= MAX_EARLY_RESETS:
                self._violation(ErrorCode.PROTOCOL_ERROR, "too many resets of streams never opened")
                return
            self._early_resets[qid] = _stream_code(code)  # its first bytes are on the way, or lost
            self._discarded += final
            return
        code = _stream_code(code)
        self._tell_reset(route, code)
        if not route.in_done:
            route.in_done = True
            if final > route.received:
                self._discarded += final - route.received
            route.opening = None
        self._reset_ours(route, code)
        self._maybe_forget(route)

    def _tell_reset(self, route: _Route, code: int) -> None:
        """The core hears of the peer's reset once (by the engine's event or the RESET frame,
        whichever comes first), and not as the answer to a reset of ours."""
        if route.sid is not None and not route.reset_sent and not route.reset_told:
            route.reset_told = True
            self._in.append(frames.encode_frame(_RESET, 0, route.sid, frames.encode_u32(code)))

    def _sid_of(self, qid: int) -> int | None:
        route = self._routes.get(qid)
        if route is None:
            return None
        return route.sid

    # --- out: frames to QUIC streams ---------------------------------------------------

    def _qid_of(self, sid: int) -> int | None:
        if (sid & 1) == (self._first_local_sid & 1):
            qid = _qid_named(sid)  # our streams' wire names are our own numbers
        else:
            qid = self._peer_qid.get(sid)
        return qid if qid is not None and qid in self._routes else None

    def _route_out(self, ftype: int, flags: int, sid: int, frame) -> None:
        if ftype == _OPEN:
            self._open(sid, flags, frame)
        elif ftype == _WINDOW_UPDATE and sid:
            qid = self._qid_of(sid)
            if qid is not None:
                self._control_out.append(frames.encode_frame(ftype, flags, _wire_name(qid), memoryview(frame)[HEADER_SIZE:]))
        elif ftype == _RESET:
            qid = self._qid_of(sid)
            if qid is not None:
                route = self._routes[qid]
                self._reset_ours(route, frames.parse_u32(memoryview(frame)[HEADER_SIZE:]), always=True)
                self._maybe_forget(route)
        elif ftype == _GOAWAY:
            last, code, reason = frames.parse_goaway(memoryview(frame)[HEADER_SIZE:])
            if self._close_code is None or self._close_code == ErrorCode.NO_ERROR:  # an error outranks a drain
                self._close_code, self._close_reason = code, reason
            self._control_out.append(frames.encode_frame(ftype, flags, 0, frames.encode_goaway(
                _wire_name(self._max_peer_qid) if self._max_peer_qid else 0, code, reason)))
        else:
            self._control_out.append(frame)
            if ftype == _PING and not flags & _ACK:
                # QUIC's own PING too: never held by flow control, it restarts the peer's
                # idle timer whatever waits on the control stream.
                self._ping_uid += 1
                self._conn.send_ping(self._ping_uid)

    def _open(self, sid: int, flags: int, frame) -> None:
        conn = self._conn
        qid = conn.get_next_available_stream_id()
        if qid != _qid_named(sid):  # pragma: no cover - the core numbers in order
            raise RuntimeError(f"QUIC stream {qid} for core stream {sid}")
        route = self._routes[qid] = _Route(qid, sid)
        fin = bool(flags & _FIN)
        head = frames.encode_frame(_OPEN, 0, 0, memoryview(frame)[HEADER_SIZE:])
        route.head = len(head)
        conn.send_stream_data(qid, head, end_stream=fin)
        route.out_done = fin
        self._unsent_routes.add(route)

    def _send_data(self, sid: int, parts: list, fin: bool) -> None:
        qid = self._qid_of(sid)
        if qid is None:
            return  # the stream was reset meanwhile
        route = self._routes[qid]
        if route.out_done:
            return
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        route.sent += len(data)
        self._conn.send_stream_data(qid, data, end_stream=fin)
        self._unsent_routes.add(route)
        if fin:
            route.out_done = True
            self._maybe_forget(route)

    def _reset_ours(self, route: _Route, code: int, always: bool = False) -> None:
        """End our direction of a reset stream: RESET_STREAM, and our RESET frame with its
        final size (sent ``always`` when the core reset the stream: the peer learns of it so;
        else only if our direction was still open)."""
        if route.reset_sent or not (always or not route.out_done):
            return
        route.reset_sent = True
        self._unsent_routes.discard(route)  # what the engine held unsent is dropped
        if not route.out_done:
            route.out_done = True
            try:
                if route.sent or not self._is_local(route.qid):
                    self._conn.reset_stream(route.qid, code)
                else:
                    # Only our OPEN is on it: let it arrive (FIN after it), so that the peer
                    # counts the open and the reset as on WSS (stream churn).
                    self._conn.send_stream_data(route.qid, b"", end_stream=True)
            except ValueError:  # the engine is already done with the stream
                pass
        self._control_out.append(frames.encode_frame(_RESET, 0, _wire_name(route.qid), _RESET_PAYLOAD.pack(code, route.sent)))

    def _maybe_forget(self, route: _Route) -> None:
        if route.out_done and route.in_done:
            del self._routes[route.qid]
            if not self._is_local(route.qid):
                self._peer_routes -= 1
                if route.sid is not None:
                    self._peer_qid.pop(route.sid, None)

    def _flush_control(self) -> None:
        if self._control_out and self._control_stream and not self.closed:
            out = self._control_out
            self._control_out = []
            data = out[0] if len(out) == 1 else b"".join(out)
            self._control_written += len(data)
            self._conn.send_stream_data(CONTROL_STREAM_ID, data)


def _wire_name(qid: int) -> int:
    """The Stream ID a frame names a tunneled stream by: the number its opener's session gave
    it (the agent's odd, the relay's even, as over WSS), from its QUIC stream ID (the agent
    opens 4, 8, 12...: 1, 3, 5...; the relay 1, 5, 9...: 2, 4, 6...)."""
    return (qid >> 1) - 1 if not qid & 3 else (qid >> 1) + 2


def _qid_named(wire_id: int) -> int:
    """The QUIC stream ID of the tunneled stream a frame names (see :func:`_wire_name`)."""
    return 2 * wire_id + 2 if wire_id & 1 else 2 * wire_id - 3


def _close_code(event) -> int:
    if event.reason_phrase == "Idle timeout":
        return ErrorCode.TIMEOUT
    if event.frame_type is None and ErrorCode.known(event.error_code):
        return event.error_code
    return ErrorCode.PROTOCOL_ERROR if event.error_code else ErrorCode.NO_ERROR


def _stream_code(code: int) -> int:
    return code if ErrorCode.known(code) else ErrorCode.PROTOCOL_ERROR
