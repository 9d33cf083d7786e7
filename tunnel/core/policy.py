"""The rules every link obeys, whichever carrier moves its bytes (docs/PROTOCOL.md).

The byte-pipe session (:mod:`tunnel.core.session`, under TLS WebSocket) and the QUIC link
(:mod:`tunnel.carriers.quic`) differ in how they move frames and stream bytes, not in what
they allow: both take the rules from here, so each rule exists once. Sans-IO: no clock (every
``now`` is passed in), no I/O, no callbacks. Answers are return values; a peer that breaks a
rule gets a :class:`~tunnel.wire.errors.ProtocolError` raised, which the caller turns into a
GOAWAY with the error's code.

- :func:`hello_payload` and :func:`accept_hello`: our HELLO and the checks of the peer's.
- :class:`LinkPolicy`: one link's liveness (keepalive PINGs, the silence timeout, the round
  trip), flood limits (PINGs, stream opens and resets, CONTROL messages), going away, the
  admission of streams the peer opens, and the half-close deadlines. What a PING, CONTROL or
  GOAWAY frame from the peer means is decided once, by :meth:`LinkPolicy.ping_frame`,
  :meth:`LinkPolicy.control_frame` and :meth:`LinkPolicy.goaway_frame`: the carriers only move
  the answers.
- :func:`check_ping` and :func:`check_reply_backlog`: a PING's payload, and a peer that makes
  us queue answers it never reads.
- :class:`SendWatermarks`: when a writer must pause and when it may resume.
- :func:`stream_credit` and :func:`session_credit`: when receive credit goes back to the peer
  (credit follows consumption, never receipt); :func:`overdraft_credit`: bounded credit beyond
  the session window for a stream starved by streams that never read; :func:`tuned_window`:
  stream windows that grow with the path's measured round trip and rate, with
  :meth:`LinkPolicy.data_received` keeping the round trip measured while data flows.

Stream objects the policy keeps (half-closed streams, paused writers) are the carrier's own;
the policy reads ``last_activity`` (the time of the stream's last progress, which the carrier
keeps current) and keeps ``buffered`` and ``paused`` up to date on them.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from tunnel import codec as frames
from tunnel.core.limits import Limits
from tunnel.core.rates import PerSecond
from tunnel.wire.constants import (
    MAX_FRAME_SIZE_CAP,
    MAX_WINDOW,
    MIN_FRAME_SIZE,
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    ErrorCode,
    Flags,
)
from tunnel.wire.control import decode_control
from tunnel.wire.errors import FloodError, ProtocolError, VersionMismatch

__all__ = [
    "KEEPALIVE_PING",
    "KEEPALIVE_TIMEOUT",
    "LinkPolicy",
    "PeerHello",
    "SendWatermarks",
    "accept_hello",
    "check_ping",
    "check_reply_backlog",
    "hello_payload",
    "overdraft_credit",
    "session_credit",
    "stream_credit",
    "tuned_window",
]

#: :meth:`LinkPolicy.keepalive_due` answers: the peer went silent for too long ...
KEEPALIVE_TIMEOUT = "timeout"
#: ... or it is time to send a keepalive PING.
KEEPALIVE_PING = "ping"

#: Outstanding PINGs remembered for the round trip; older ones are forgotten.
MAX_PENDING_PINGS = 16
#: While data flows, the round trip is measured with a PING at most this often (seconds; the
#: peer limits our PING rate).
RTT_SAMPLE_INTERVAL = 0.1
_PING_PAYLOAD = struct.Struct("!Q")
_ACK = int(Flags.ACK)
#: Control frames queued in answer to the peer (PING ACKs, refusals) while it does not read
#: what we send: above this many bytes the peer is flooding us.
MAX_REPLY_BACKLOG = 1024 * 1024
_INF = float("inf")


# --- HELLO ------------------------------------------------------------------------------


class PeerHello(NamedTuple):
    """What the peer's HELLO announced, after the checks."""

    #: The version both sides speak: the highest common one.
    version: int
    stream_window: int
    session_window: int
    max_frame_size: int
    max_streams: int


def hello_payload(limits: Limits) -> bytes:
    """Our HELLO: the versions we speak and our receive-side limits."""
    return frames.encode_hello(
        MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, limits.initial_stream_window, limits.session_window,
        limits.max_frame_size, limits.max_concurrent_streams,
    )


def accept_hello(payload) -> PeerHello:
    """Check the peer's HELLO payload; raise :class:`VersionMismatch` when no version is
    common, :class:`ProtocolError` for a malformed or out-of-range field."""
    lo, hi, stream_window, session_window, max_frame, max_streams = frames.parse_hello(payload)
    version = min(hi, PROTOCOL_VERSION)
    if version < max(lo, MIN_PROTOCOL_VERSION):
        raise VersionMismatch(
            f"peer speaks versions {lo}..{hi}, we speak {MIN_PROTOCOL_VERSION}..{PROTOCOL_VERSION}")
    if not MIN_FRAME_SIZE <= max_frame <= MAX_FRAME_SIZE_CAP:
        raise ProtocolError(f"HELLO max frame size {max_frame} out of range")
    if not 1 <= stream_window <= MAX_WINDOW or not 1 <= session_window <= MAX_WINDOW:
        raise ProtocolError("HELLO window out of range")
    return PeerHello(version, stream_window, session_window, max_frame, max_streams)


# --- answers the peer asks for ---------------------------------------------------------


def check_ping(payload) -> None:
    """A PING (or its ACK) carries exactly the 8 bytes the answer echoes; else
    :class:`ProtocolError`."""
    if len(payload) != _PING_PAYLOAD.size:
        raise ProtocolError(f"PING payload of {len(payload)} bytes")


def check_reply_backlog(queued: int) -> None:
    """``queued`` bytes of our answers (the next one included) wait for the peer to read
    them: :class:`FloodError` above :data:`MAX_REPLY_BACKLOG` (a peer that sends PINGs and
    never reads the ACKs would grow our buffers without bound)."""
    if queued > MAX_REPLY_BACKLOG:
        raise FloodError("peer does not read our answers")


# --- receive credit ---------------------------------------------------------------------


def stream_credit(limit: int, consumed: int, window: int) -> int:
    """Credit to grant a stream now (0: not yet).

    ``limit`` is the stream offset the peer may send up to, ``consumed`` how far the
    application has consumed. Once at most half a ``window`` of credit is left, the limit
    moves to ``consumed + window``: one WINDOW_UPDATE (or MAX_STREAM_DATA) per half window.
    """
    if limit - consumed <= window >> 1:
        return consumed + window - limit
    return 0


def session_credit(limit: int, received: int, consumed: int, window: int) -> int:
    """Credit to grant the link now (0: not yet).

    ``limit``, ``received`` and ``consumed`` are byte counts across all streams. Consumed
    credit not yet granted goes back once it reaches what the peer has left (``limit -
    received``): half a window when the application keeps up, earlier when stalled streams
    hold part of the window, so that they cannot starve the others.
    """
    ungranted = consumed + window - limit
    if ungranted > 0 and ungranted >= limit - received:
        return ungranted
    return 0


def overdraft_credit(limit: int, received: int, consumed: int, window: int, room: int) -> int:
    """Link credit beyond :func:`session_credit` for a stream starved by others (0: none).

    ``room`` is the stream credit left to a stream that has consumed everything it received
    (0 if there is none). Streams whose receivers never read keep what their stream credit
    let in; once they hold the whole link window, the peer has no link credit left for
    anyone. When the peer holds at most an eighth of a ``window`` of link credit, the limit
    moves to ``received + room``, so the starved stream can be sent what its own window
    allows, as long as the bytes held unconsumed are at most ``2 * window``. The receiver
    thus holds at most ``2 * window + room`` bytes, whatever the application does. Credit
    above ``consumed + window`` is repaid first: :func:`session_credit` grants nothing more
    until consumption has caught up with it.
    """
    if room <= 0 or limit - received > window >> 3 or received - consumed > 2 * window:
        return 0
    credit = received + room - limit
    return credit if credit > 0 else 0


def tuned_window(window: int, max_window: int, consumed: int, elapsed: float, rtt: float | None) -> int:
    """A stream's receive window after an epoch in which the application consumed
    ``consumed`` bytes in ``elapsed`` seconds (quic-go's auto-tuning, as HTTP/2 and QUIC
    stacks grow their windows).

    An epoch lasts until more than half the window was consumed. When that took less than
    ``4 * consumed / window`` round trips (two for half a window), the window is what holds
    the sender back: it doubles, up to ``max_window``. A path whose bandwidth-delay product
    exceeds the initial window gets a window that fills it within a few round trips; a slow
    reader never grows one.
    """
    if rtt is None or window >= max_window:
        return window
    if elapsed < 4 * consumed / window * rtt:
        return min(2 * window, max_window)
    return window


# --- send watermarks --------------------------------------------------------------------


class SendWatermarks:
    """When writers pause and resume, per stream and across the link.

    A stream whose queued outgoing bytes (``stream.buffered``) go above
    ``stream_send_high_water`` pauses; so does every stream that queues while the link's total
    is above ``session_send_high_water``. A paused stream resumes once its queue is below
    ``stream_send_low_water`` and the link's total below its high-water mark. The carrier
    moves bytes in and out with :meth:`add` and :meth:`remove` (or updates ``buffered`` and
    :attr:`total` itself on its hot path) and resumes what :meth:`resumable` and
    :meth:`drained` return.
    """

    __slots__ = ("stream_high", "stream_low", "link_high", "total", "link_full", "paused")

    def __init__(self, limits: Limits) -> None:
        self.stream_high = limits.stream_send_high_water
        self.stream_low = limits.stream_send_low_water
        self.link_high = limits.session_send_high_water
        #: Outgoing bytes queued across all streams of the link.
        self.total = 0
        #: The total went above the link's high-water mark and has not drained below it.
        self.link_full = False
        #: Streams told to pause, waiting to be resumed.
        self.paused: set = set()

    def add(self, stream, n: int) -> None:
        """``n`` bytes were queued on ``stream``: pause it if a mark is crossed."""
        stream.buffered += n
        self.total += n
        if stream.buffered > self.stream_high:
            self._pause(stream)
        if self.total > self.link_high:
            self.link_full = True
            self._pause(stream)

    def remove(self, stream, n: int) -> None:
        """``n`` bytes left ``stream``'s queue (sent, or dropped by a reset)."""
        stream.buffered -= n
        self.total -= n

    def resumable(self, stream) -> bool:
        """True (and no longer paused) if ``stream`` was paused and may be resumed now."""
        if stream.paused and stream.buffered < self.stream_low and not self.link_full:
            stream.paused = False
            self.paused.discard(stream)
            return True
        return False

    def drained(self) -> list:
        """Once the link's total fell below its high-water mark: the paused streams whose own
        queues are short, now resumed (the caller tells their writers)."""
        if not self.link_full or self.total >= self.link_high:
            return []
        self.link_full = False
        resumed = [s for s in self.paused if s.buffered < self.stream_low]
        for s in resumed:
            s.paused = False
            self.paused.discard(s)
        return resumed

    def forget(self, stream) -> None:
        """``stream`` is gone: its queued bytes no longer count."""
        self.total -= stream.buffered
        stream.buffered = 0
        if stream.paused:
            stream.paused = False
            self.paused.discard(stream)

    def clear(self) -> None:
        self.total = 0
        self.link_full = False
        self.paused.clear()

    def _pause(self, stream) -> None:
        if not stream.paused:
            stream.paused = True
            self.paused.add(stream)


# --- the link's policy ------------------------------------------------------------------


class LinkPolicy:
    """Liveness, flood limits, going away, stream admission and half-close deadlines of one
    link (see the module docstring). Time is always passed in."""

    __slots__ = (
        "limits", "last_received", "rtt", "peer_streams", "goaway_sent", "goaway_code",
        "goaway_received", "max_window", "_last_ping", "_pings", "_ping_counter", "_ping_rate",
        "_churn_rate", "_control_rate", "_half_closed", "_half_close_at", "_rtt_ping", "_rtt_next",
    )

    def __init__(self, limits: Limits, now: float) -> None:
        self.limits = limits
        #: When the peer last sent anything (keepalive: the carrier sets it on every input).
        self.last_received = now
        #: The last round trip a PING measured (seconds), None before the first.
        self.rtt: float | None = None
        #: Streams the peer opened that are still open.
        self.peer_streams = 0
        self.goaway_sent = False
        #: The code of the GOAWAY we sent (None: none sent).
        self.goaway_code: int | None = None
        self.goaway_received = False
        #: Largest stream window :func:`tuned_window` may grow to.
        self.max_window = min(limits.max_stream_window, limits.session_window)
        self._rtt_ping: bytes | None = None  # the PING timing the round trip while data flows
        self._rtt_next = now  # no new one before this
        self._last_ping = -_INF
        self._pings: dict[bytes, float] = {}
        self._ping_counter = 0
        self._ping_rate = PerSecond(now)
        self._churn_rate = PerSecond(now)
        self._control_rate = PerSecond(now)
        self._half_closed: set = set()
        self._half_close_at: float | None = None

    # --- timers ---------------------------------------------------------------------

    def next_deadline(self) -> float:
        """The earliest time :meth:`keepalive_due` or :meth:`expired_half_closed` has work."""
        limits = self.limits
        at = self.last_received + limits.keepalive_timeout
        ping_at = max(self.last_received, self._last_ping) + limits.keepalive_interval
        if ping_at < at:
            at = ping_at
        if self._half_close_at is not None and self._half_close_at < at:
            at = self._half_close_at
        return at

    def keepalive_due(self, now: float) -> str | None:
        """:data:`KEEPALIVE_TIMEOUT` once the peer was silent for ``keepalive_timeout``;
        :data:`KEEPALIVE_PING` (then send :meth:`new_ping`) once it was silent for
        ``keepalive_interval`` since its last input or our last keepalive PING; else None."""
        limits = self.limits
        if now - self.last_received >= limits.keepalive_timeout:
            return KEEPALIVE_TIMEOUT
        if now >= max(self.last_received, self._last_ping) + limits.keepalive_interval:
            self._last_ping = now
            return KEEPALIVE_PING
        return None

    # --- PING -----------------------------------------------------------------------

    def new_ping(self, now: float) -> bytes:
        """The payload of a PING to send now, remembered to measure the round trip."""
        self._ping_counter += 1
        payload = _PING_PAYLOAD.pack(self._ping_counter & 0xFFFFFFFFFFFFFFFF)
        if len(self._pings) >= MAX_PENDING_PINGS:
            oldest = next(iter(self._pings))
            del self._pings[oldest]
            if oldest == self._rtt_ping:
                self._rtt_ping = None  # never answered: the next DATA sends a new one
        self._pings[payload] = now
        return payload

    def ping_acked(self, payload, now: float) -> float | None:
        """The peer answered a PING: the round trip, or None for an answer to no PING of ours."""
        payload = bytes(payload)
        sent = self._pings.pop(payload, None)
        if sent is None:
            return None
        self.rtt = now - sent
        if payload == self._rtt_ping:
            self._rtt_ping = None
            self._rtt_next = now + RTT_SAMPLE_INTERVAL
        return self.rtt

    # --- the round trip while data flows ----------------------------------------------

    def retune(self, stream, consumed: int, now: float) -> None:
        """A grant of credit is due on ``stream``: once more than half its window was consumed
        since its auto-tuning epoch began, the epoch ends here, growing ``stream.window`` by
        :func:`tuned_window` if the window held the sender back. The carrier keeps ``window``,
        ``epoch_at`` and ``epoch_consumed`` on its streams and passes how far the application
        consumed the stream."""
        in_epoch = consumed - stream.epoch_consumed
        if in_epoch <= stream.window >> 1:
            return  # the epoch goes on
        stream.window = tuned_window(stream.window, self.max_window, in_epoch, now - stream.epoch_at, self.rtt)
        stream.epoch_at = now
        stream.epoch_consumed = consumed

    def data_received(self, n: int, now: float) -> bytes | None:
        """``n`` DATA bytes arrived: the payload of a PING to send now when the round trip
        should be measured again (window auto-tuning needs it while data flows; keepalive
        PINGs only go out when the link is quiet), else None."""
        if self._rtt_ping is not None or now < self._rtt_next or self.max_window <= self.limits.initial_stream_window:
            return None  # one at a time, not too often, and only if windows can grow
        self._rtt_ping = self.new_ping(now)
        return self._rtt_ping

    def ping_frame(self, flags: int, payload, now: float) -> tuple:
        """The peer sent a PING frame: ``(answer, rtt)``. For a PING, ``answer`` is the
        payload of the ACK to send back (:class:`FloodError` above ``max_ping_rate``); for an
        ACK, ``rtt`` is the round trip it measured (None: it answers no PING of ours).
        :class:`ProtocolError` for a payload of the wrong length."""
        check_ping(payload)
        if flags & _ACK:
            return None, self.ping_acked(payload, now)
        self.ping_received(now)
        return bytes(payload), None

    def ping_received(self, now: float) -> None:
        """The peer sent a PING (answer it with an ACK); :class:`FloodError` above
        ``max_ping_rate`` per second."""
        if self._ping_rate.count(now) > self.limits.max_ping_rate:
            raise FloodError("PING flood")

    # --- floods ---------------------------------------------------------------------

    def control_frame(self, payload, now: float) -> dict:
        """The peer sent a CONTROL frame: its message. :class:`FloodError` above
        ``max_control_rate`` per second, :class:`ProtocolError` if it is malformed."""
        self.control_received(now)
        limits = self.limits
        return decode_control(payload, limits.max_control_size, limits.max_control_depth)

    def control_received(self, now: float) -> None:
        """The peer sent a CONTROL message; :class:`FloodError` above ``max_control_rate``
        per second."""
        if self._control_rate.count(now) > self.limits.max_control_rate:
            raise FloodError("CONTROL message flood")

    def count_churn(self, now: float) -> None:
        """The peer opened or reset a stream; :class:`FloodError` above
        ``max_stream_churn_rate`` per second."""
        if self._churn_rate.count(now) > self.limits.max_stream_churn_rate:
            raise FloodError("stream open/reset flood")

    # --- streams the peer opens -------------------------------------------------------

    def admit_peer_stream(self) -> int | None:
        """The peer opens a stream: None to accept it (counted until
        :meth:`peer_stream_closed`), else the code to reset it with (REFUSED after our GOAWAY,
        STREAM_LIMIT beyond ``max_concurrent_streams``)."""
        if self.goaway_sent:
            return ErrorCode.REFUSED
        if self.peer_streams >= self.limits.max_concurrent_streams:
            return ErrorCode.STREAM_LIMIT
        self.peer_streams += 1
        return None

    def peer_stream_closed(self) -> None:
        self.peer_streams -= 1

    # --- going away -------------------------------------------------------------------

    def send_goaway(self, code: int) -> bool:
        """We are about to send GOAWAY(code): False if one with that code was sent already."""
        code = int(code)
        if self.goaway_code == code:
            return False
        self.goaway_sent = True
        self.goaway_code = code
        return True

    def goaway_frame(self, payload) -> tuple:
        """The peer sent a GOAWAY frame: ``(last_stream_id, code, reason, close_now)``. With
        ``close_now`` (an error code) the link closes at once; else it drains, and our streams
        above ``last_stream_id`` were never processed by the peer (reset them with REFUSED)."""
        last, code, reason = frames.parse_goaway(payload)
        return last, code, reason, self.goaway_from_peer(code)

    def goaway_from_peer(self, code: int) -> bool:
        """The peer sent GOAWAY: True if the link must close now (an error code); else it
        drains (our streams above the peer's last stream id were refused: reset them)."""
        self.goaway_received = True
        return code != ErrorCode.NO_ERROR

    @property
    def going_away(self) -> bool:
        """GOAWAY sent or received: no new streams either way."""
        return self.goaway_sent or self.goaway_received

    def drained(self, open_streams: int) -> bool:
        """True once a link going away has no stream left: it closes (NO_ERROR, "drained")."""
        return not open_streams and (self.goaway_sent or self.goaway_received)

    # --- half-close deadlines ---------------------------------------------------------

    def half_closed(self, stream, now: float) -> None:
        """``stream`` is half-closed: without progress (``stream.last_activity``) for
        ``half_close_timeout`` it expires."""
        stream.last_activity = now
        self._half_closed.add(stream)
        deadline = now + self.limits.half_close_timeout
        if self._half_close_at is None or deadline < self._half_close_at:
            self._half_close_at = deadline

    def forget_half_closed(self, stream) -> None:
        self._half_closed.discard(stream)

    @property
    def half_closed_streams(self) -> frozenset:
        """The half-closed streams being watched (a carrier that learns of progress only by
        looking, such as acknowledgements on QUIC, refreshes their ``last_activity``)."""
        return frozenset(self._half_closed)

    def expired_half_closed(self, now: float) -> list:
        """Half-closed streams without progress for ``half_close_timeout`` (forgotten here;
        the caller resets them with TIMEOUT)."""
        if self._half_close_at is None or now < self._half_close_at:
            return []
        timeout = self.limits.half_close_timeout
        expired = []
        next_at = None
        for stream in self._half_closed:
            deadline = stream.last_activity + timeout
            if deadline <= now:
                expired.append(stream)
            elif next_at is None or deadline < next_at:
                next_at = deadline
        for stream in expired:
            self._half_closed.discard(stream)
        self._half_close_at = next_at
        return expired

    def clear(self) -> None:
        """The link closed: nothing is pending any more."""
        self._half_closed.clear()
        self._half_close_at = None
        self._pings.clear()
        self._rtt_ping = None
        self.peer_streams = 0
