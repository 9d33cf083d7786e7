"""The sans-IO multiplexer: one link's protocol state machine (docs/PROTOCOL.md).

Design in a few lines:

- Bytes in (:meth:`Session.receive_data`) go through the codec's ``FrameDecoder``, then a
  dispatch table indexed by frame type; per-stream frames drive the stream state TABLE
  (:data:`tunnel.core.session_state.TRANSITIONS`, ``(state, input) -> new state``; anything
  missing is a violation).
  Facts come out as events (:meth:`Session.pop_events`), never as callbacks. The DATA of a
  stream given a receiver (:meth:`Session.set_receiver`) is collected per stream instead, for
  :meth:`Session.pop_received`: no event object per frame on the adapter's hot path.
- Bytes out (:meth:`Session.data_to_send`): control frames (small ``bytes``) wait in one
  deque and always go first; stream data waits, uncopied, as memoryviews in per-stream deques
  and is scheduled round-robin over the streams that have data and credit, one
  ``send_quantum`` per stream per round, in frames no larger than the peer's max frame size.
  The list returned is frame headers interleaved with slices of the application's buffers,
  ready for ``transport.writelines``.
- Flow control: our receive windows shrink on receipt and are granted back only in
  :meth:`Session.consume`, by the rules of :mod:`tunnel.core.policy` (a stream's
  WINDOW_UPDATE once half its window was consumed, the session's once the consumed credit
  reaches what the peer has left; an overdraft beyond it for a reading stream that streams
  whose receivers never read have starved).
- The link's rules (HELLO checks, keepalive, PING, floods, going away, stream admission,
  half-close deadlines, send watermarks) are :class:`tunnel.core.policy.LinkPolicy` and
  friends, which the QUIC carrier obeys too; this module applies them to a byte pipe.
- What it keeps (the link's fields and what can be read of them, each stream's record) is
  :mod:`tunnel.core.session_state`; this module holds what changes it.
- No clock: every time is the ``now`` the caller passes; :meth:`Session.next_timer` and
  :meth:`Session.handle_timer` drive keepalive and half-close timeouts.
- Peer mistakes never raise: a stream-level one resets the stream (``StreamReset`` with
  ``remote=False``), a link-level one queues GOAWAY and reports ``ConnectionClosed``; input
  after that is ignored. API misuse raises :class:`tunnel.wire.errors.UsageError`.
"""

from __future__ import annotations

from tunnel import codec as frames
from tunnel.core.events import (
    ConnectionClosed,
    ControlReceived,
    DataReceived,
    Event,
    GoAwayReceived,
    PingAcknowledged,
    SessionReady,
    StreamClosed,
    StreamEnded,
    StreamOpened,
    StreamReset,
    StreamWritable,
)
from tunnel.core.limits import DEFAULT_LIMITS, Limits
from tunnel.core.policy import (
    KEEPALIVE_PING,
    KEEPALIVE_TIMEOUT,
    accept_hello,
    check_reply_backlog,
    hello_payload,
    overdraft_credit,
    session_credit,
    stream_credit,
)
from tunnel.core.session_state import TRANSITIONS, Role, SessionState, StreamInput, StreamRecord, StreamState
from tunnel.wire.constants import (
    HEADER_SIZE,
    MAX_STREAM_ID,
    MAX_WINDOW,
    ErrorCode,
    Flags,
    FrameType,
)
from tunnel.wire.control import encode_control
from tunnel.wire.errors import (
    FlowControlError,
    ProtocolError,
    SessionClosed,
    StreamClosedError,
    StreamStateError,
    UsageError,
)

__all__ = ["Session"]


_S = StreamState
_I = StreamInput

# Fast form of the table for the hot path: _NEXT[state] is {input: new state}, as plain ints.
_NEXT: list[dict[int, int]] = [{} for _ in StreamState]
for (_state, _input), _new in TRANSITIONS.items():
    _NEXT[_state][int(_input)] = int(_new)
del _state, _input, _new

_OPEN = int(_S.OPEN)
_HCL = int(_S.HALF_CLOSED_LOCAL)
_HCR = int(_S.HALF_CLOSED_REMOTE)
_CLOSED = int(_S.CLOSED)
_RECV_DATA = int(_I.RECV_DATA)
_RECV_FIN = int(_I.RECV_FIN)
_SEND_DATA = int(_I.SEND_DATA)
_SEND_FIN = int(_I.SEND_FIN)

_DATA = int(FrameType.DATA)
_FIN = int(Flags.FIN)
_ACK = int(Flags.ACK)
_INF = float("inf")


class Session(SessionState):
    """One link's multiplexer. See the module docstring; events in :mod:`tunnel.core.events`."""

    def __init__(self, role: Role, limits: Limits = DEFAULT_LIMITS, now: float = 0.0) -> None:
        SessionState.__init__(self, role, limits, now)
        self._handlers = [
            self._on_data,
            self._on_open,
            self._on_reset,
            self._on_window_update,
            self._on_ping,
            self._on_goaway,
            self._on_hello,
            self._on_control,
        ]
        self._queue_control(frames.encode_frame(FrameType.HELLO, 0, 0, hello_payload(limits)))

    # --- input ------------------------------------------------------------------------

    def receive_data(self, data, now: float) -> None:
        """Feed bytes from the peer. Never raises for anything the peer sends."""
        self._now = now
        if self._closed:
            return
        if len(data):
            self._policy.last_received = now
        try:
            decoded = self._decoder.feed(data)
        except ProtocolError as exc:
            self._fail(exc.code, str(exc))
            return
        handlers = self._handlers
        try:
            for ftype, flags, sid, payload in decoded:
                if ftype == _DATA and self._hello_received:
                    self._on_data(flags, sid, payload)
                elif not self._hello_received:
                    self._on_first_frame(ftype, sid, payload)
                else:
                    handlers[ftype](flags, sid, payload)
                if self._closed:
                    return
        except ProtocolError as exc:
            self._fail(exc.code, str(exc))
        except Exception as exc:  # a bug here must not take the process down
            self._fail(ErrorCode.INTERNAL_ERROR, f"internal error: {type(exc).__name__}")

    def pop_events(self) -> list[Event]:
        events = self._events
        self._events = []
        return events

    def set_receiver(self, stream_id: int, receiver: object) -> None:
        """From now on, collect the stream's DATA payloads for :meth:`pop_received` (handed
        back with ``receiver``, any object but None) instead of reporting ``DataReceived``
        events. Nothing happens for a stream that is closed or unknown."""
        s = self._streams.get(stream_id)
        if s is not None:
            s.receiver = receiver

    def pop_received(self) -> list[tuple[object, list]]:
        """The DATA payloads received since the last call for streams with a receiver: one
        ``(receiver, payloads)`` per stream, in the order the streams first got data, the
        payloads in order. The rules of ``DataReceived.data`` apply to each payload (consume
        it; a view is valid only until the next ``receive_data``). Call it after each
        ``receive_data`` and before :meth:`pop_events`: a stream's events (``StreamEnded``,
        ``StreamReset``...) then follow its data, as they follow it on the wire."""
        streams = self._inbox_streams
        if not streams:
            return []
        self._inbox_streams = []
        received = []
        for s in streams:
            received.append((s.receiver, s.inbox))
            s.inbox = None
        return received

    # --- frame handlers ---------------------------------------------------------------

    def _on_first_frame(self, ftype: int, sid: int, payload) -> None:
        if ftype != FrameType.HELLO:
            raise ProtocolError(f"{FrameType(ftype).name} before HELLO")
        if sid:
            raise ProtocolError("HELLO on a stream")
        peer = accept_hello(payload)
        self._hello_received = True
        self._version = peer.version
        self._peer_stream_window = peer.stream_window
        self._send_session_window = peer.session_window
        self._peer_max_frame = peer.max_frame_size
        self._events.append(SessionReady(peer.version))

    def _on_hello(self, flags: int, sid: int, payload) -> None:
        raise ProtocolError("second HELLO")

    def _check_known_id(self, sid: int, what: str) -> None:
        """A frame for a stream we do not track: ignore it if the stream existed (closed
        recently; the ids are monotonic so 'existed' is 'not above the highest opened'),
        else it is a PROTOCOL_ERROR."""
        if sid == 0:
            raise ProtocolError(f"{what} on stream 0")
        if (sid & 1) == self._local_parity:
            if sid > self._last_local_id:
                raise StreamStateError(f"{what} for stream {sid} that we never opened")
        elif sid > self._last_peer_id:
            raise StreamStateError(f"{what} for stream {sid} that the peer never opened")

    def _on_data(self, flags: int, sid: int, payload) -> None:
        n = len(payload)
        received = self._recv_received + n
        if received > self._recv_limit:
            raise FlowControlError(f"DATA of {n} bytes exceeds the session window "
                                   f"({self._recv_limit - self._recv_received} left)")
        s = self._streams.get(sid)
        if s is None:
            self._check_known_id(sid, "DATA")
            # Recently closed: the bytes were sent against the session's credit; drop them
            # and give the credit straight back.
            self._recv_received = received
            self._credit_session(n)
            return
        if s.received + n > s.recv_limit:
            raise FlowControlError(f"DATA of {n} bytes exceeds stream {sid}'s window "
                                   f"({s.recv_limit - s.received} left)")
        if _RECV_DATA not in _NEXT[s.state]:
            self._recv_received = received
            self._credit_session(n)
            self._stream_error(s, ErrorCode.STREAM_CLOSED)
            return
        self._recv_received = received
        s.received += n
        self.bytes_received += n
        if self._recv_limit - received <= self._limits.session_window >> 3:
            self._relieve_starved()
        ping = self._policy.data_received(n, self._now)
        if ping is not None:
            self._queue_control(frames.encode_frame(FrameType.PING, 0, 0, ping))
        s.last_activity = self._now
        if n:
            if s.receiver is None:
                self._events.append(DataReceived(sid, payload))
            elif s.inbox is None:
                s.inbox = [payload]
                self._inbox_streams.append(s)
            else:
                s.inbox.append(payload)
        if flags & _FIN:
            s.state = _NEXT[s.state][_RECV_FIN]
            self._events.append(StreamEnded(sid))
            if s.state == _CLOSED:
                self._forget(s)
            else:
                self._enter_half_closed(s)

    def _on_open(self, flags: int, sid: int, payload) -> None:
        if sid == 0 or (sid & 1) == self._local_parity:
            raise ProtocolError(f"OPEN of stream {sid}: wrong parity")
        if sid <= self._last_peer_id:
            raise ProtocolError(f"OPEN of stream {sid}: not above {self._last_peer_id}")
        self._last_peer_id = sid
        self._policy.count_churn(self._now)
        if len(payload) > self._limits.max_open_metadata:
            self._queue_reply(frames.encode_frame(FrameType.RESET, 0, sid, frames.encode_u32(ErrorCode.PROTOCOL_ERROR)))
            return
        refusal = self._policy.admit_peer_stream()
        if refusal is not None:
            self._queue_reply(frames.encode_frame(FrameType.RESET, 0, sid, frames.encode_u32(refusal)))
            return
        fin = bool(flags & _FIN)
        s = StreamRecord(sid, False, self._peer_stream_window, self._limits.initial_stream_window, self._now)
        s.state = _NEXT[s.state][_I.RECV_OPEN_FIN if fin else _I.RECV_OPEN]
        self._streams[sid] = s
        self._grant_overdraft(s)
        self._events.append(StreamOpened(sid, bytes(payload)))
        if fin:
            self._events.append(StreamEnded(sid))
            self._enter_half_closed(s)

    def _on_reset(self, flags: int, sid: int, payload) -> None:
        code = frames.parse_u32(payload)
        self._policy.count_churn(self._now)
        s = self._streams.get(sid)
        if s is None:
            self._check_known_id(sid, "RESET")
            return
        s.state = _NEXT[s.state][_I.RECV_RESET]
        self._drop_queue(s)
        self._events.append(StreamReset(sid, code, True))
        self._forget(s)

    def _on_window_update(self, flags: int, sid: int, payload) -> None:
        increment = frames.parse_u32(payload)
        if increment == 0:
            raise ProtocolError("WINDOW_UPDATE with a zero increment")
        if sid == 0:
            window = self._send_session_window + increment
            if window > MAX_WINDOW:
                raise FlowControlError("session window above 2^31-1")
            self._send_session_window = window
            return
        s = self._streams.get(sid)
        if s is None:
            self._check_known_id(sid, "WINDOW_UPDATE")
            return
        window = s.send_window + increment
        if window > MAX_WINDOW:
            raise FlowControlError(f"stream {sid} window above 2^31-1")
        s.send_window = window
        s.last_activity = self._now
        if not s.scheduled and s.buffered:
            s.scheduled = True
            self._active.append(s)

    def _on_ping(self, flags: int, sid: int, payload) -> None:
        if sid:
            raise ProtocolError("PING on a stream")
        answer, rtt = self._policy.ping_frame(flags, payload, self._now)
        if answer is not None:
            self._queue_reply(frames.encode_frame(FrameType.PING, _ACK, 0, answer))
        elif rtt is not None:
            self._events.append(PingAcknowledged(rtt))

    def _on_goaway(self, flags: int, sid: int, payload) -> None:
        if sid:
            raise ProtocolError("GOAWAY on a stream")
        last, code, reason, close_now = self._policy.goaway_frame(payload)
        self._events.append(GoAwayReceived(last, code, reason))
        if close_now:
            self._terminate(code, reason, remote=True)
            return
        # Our streams above ``last`` were never processed by the peer.
        for s in [s for s in self._streams.values() if s.local and s.id > last]:
            s.state = _CLOSED
            self._drop_queue(s)
            self._events.append(StreamReset(s.id, ErrorCode.REFUSED, True))
            self._forget(s)
        self._check_drained()

    def _on_control(self, flags: int, sid: int, payload) -> None:
        if sid:
            raise ProtocolError("CONTROL on a stream")
        self._events.append(ControlReceived(self._policy.control_frame(payload, self._now)))

    # --- stream bookkeeping -----------------------------------------------------------

    def _enter_half_closed(self, s: StreamRecord) -> None:
        self._policy.half_closed(s, self._now)

    def _drop_queue(self, s: StreamRecord) -> None:
        if s.buffered:
            self._send.remove(s, s.buffered)
            s.queue.clear()
        s.fin_pending = False

    def _forget(self, s: StreamRecord) -> None:
        """The stream is closed both ways: report it and keep nothing of it."""
        s.state = _CLOSED
        del self._streams[s.id]
        if not s.local:
            self._policy.peer_stream_closed()
        self._policy.forget_half_closed(s)
        self._send.forget(s)
        if not self._streams:
            self._active.clear()  # closed streams are otherwise skipped lazily
        self._events.append(StreamClosed(s.id))
        self._check_drained()

    def _stream_error(self, s: StreamRecord, code: int) -> None:
        """The peer broke one stream's rules: reset that stream, keep the link."""
        self._queue_control(frames.encode_frame(FrameType.RESET, 0, s.id, frames.encode_u32(code)))
        self._drop_queue(s)
        self._events.append(StreamReset(s.id, code, False))
        self._forget(s)

    def _check_drained(self) -> None:
        if not self._closed and self._policy.drained(len(self._streams)):
            self._terminate(ErrorCode.NO_ERROR, "drained", remote=not self._policy.goaway_sent)

    # --- output -----------------------------------------------------------------------

    def _queue_control(self, frame: bytes) -> None:
        self._control.append(frame)
        self._control_bytes += len(frame)

    def _queue_reply(self, frame: bytes) -> None:
        """A control frame the peer's input asked for; a peer that makes us queue many
        without reading them floods us."""
        check_reply_backlog(self._control_bytes + len(frame))
        self._queue_control(frame)

    def data_to_send(self, max_bytes: int | None = None) -> list:
        """What to write now, for ``transport.writelines``: control frames first, then DATA
        round-robin. ``max_bytes`` caps the total (a control frame is never split)."""
        out: list = []
        budget = _INF if max_bytes is None else max_bytes
        control = self._control
        if control:
            taken = 0
            while control and budget > 0:
                frame = control.popleft()
                out.append(frame)
                budget -= len(frame)
                taken += len(frame)
            self._control_bytes -= taken
            if control:
                return out
        if self._closed or not self._active:
            return out
        self._schedule(out, budget)
        return out

    def _schedule(self, out: list, budget: float) -> None:
        active = self._active
        quantum = self._limits.send_quantum
        max_frame = self._peer_max_frame
        encode_header = frames.encode_header
        watermarks = self._send
        now = self._now
        sent_total = 0
        while active and budget > HEADER_SIZE:
            s = active[0]
            if s.state == _CLOSED:
                active.popleft()
                s.scheduled = False
                continue
            if s.buffered:
                allowance = s.send_window
                if allowance <= 0:
                    active.popleft()
                    s.scheduled = False
                    continue
                if self._send_session_window < allowance:
                    allowance = self._send_session_window
                    if allowance <= 0:
                        break  # session credit exhausted: wait for WINDOW_UPDATE on 0
                turn = s.turn_left or quantum
                if turn < allowance:
                    allowance = turn
            else:
                allowance = 0
            active.popleft()
            s.scheduled = False
            sid = s.id
            queue = s.queue
            sent = 0
            fin_sent = False
            while allowance > 0 and budget > HEADER_SIZE:
                n = s.buffered
                if allowance < n:
                    n = allowance
                if max_frame < n:
                    n = max_frame
                if budget - HEADER_SIZE < n:
                    n = int(budget - HEADER_SIZE)
                s.buffered -= n
                if not s.buffered and s.fin_pending:
                    out.append(encode_header(_DATA, _FIN, sid, n))
                    fin_sent = True
                else:
                    out.append(encode_header(_DATA, 0, sid, n))
                allowance -= n
                budget -= n + HEADER_SIZE
                sent += n
                while n:
                    head = queue[0]
                    size = len(head)
                    if size <= n:
                        queue.popleft()
                        out.append(head)
                        n -= size
                    else:
                        out.append(head[:n])
                        queue[0] = head[n:]
                        n = 0
                if not s.buffered:
                    break
            if not s.buffered and s.fin_pending and not fin_sent and budget >= HEADER_SIZE:
                out.append(encode_header(_DATA, _FIN, sid, 0))
                budget -= HEADER_SIZE
                fin_sent = True
            if sent:
                s.send_window -= sent
                self._send_session_window -= sent
                sent_total += sent
                s.last_activity = now
            if fin_sent:
                s.fin_pending = False
                s.state = _NEXT[s.state][_SEND_FIN]
                if s.state == _CLOSED:
                    self._forget(s)
                    if self._closed:  # that was the last stream of a draining session
                        return
                    continue
                self._enter_half_closed(s)
            if s.paused and watermarks.resumable(s):
                self._events.append(StreamWritable(sid))
            if (s.buffered and s.send_window > 0) or s.fin_pending:
                s.scheduled = True
                if allowance > 0 and s.buffered and budget <= HEADER_SIZE:
                    # Cut short by max_bytes: the rest of the turn comes first next time.
                    s.turn_left = allowance
                    active.appendleft(s)
                    break
                s.turn_left = 0
                active.append(s)
            else:
                s.turn_left = 0
        if sent_total:
            watermarks.total -= sent_total
            self.bytes_sent += sent_total
        self._check_session_low()

    def _check_session_low(self) -> None:
        for s in self._send.drained():
            self._events.append(StreamWritable(s.id))

    # --- application API --------------------------------------------------------------

    def _stream_for_send(self, stream_id: int) -> StreamRecord:
        s = self._streams.get(stream_id)
        if s is None:
            raise StreamClosedError(f"stream {stream_id} is closed or unknown")
        if s.fin_pending or _SEND_DATA not in _NEXT[s.state]:
            raise StreamClosedError(f"stream {stream_id} is already ended")
        return s

    def open_stream(self, metadata: bytes = b"", end_stream: bool = False) -> int:
        """Open a stream towards the peer and return its id (after ``SessionReady``)."""
        if self._closed:
            raise SessionClosed("session is closed")
        if not self._hello_received:
            raise UsageError("streams may be opened only after both HELLOs (SessionReady)")
        if self._policy.going_away:
            raise SessionClosed("session is going away")
        sid = self._next_local_id
        if sid > MAX_STREAM_ID:
            raise SessionClosed("stream ids exhausted")
        metadata = bytes(metadata)
        if len(metadata) > self._limits.max_open_metadata:
            raise UsageError(f"OPEN metadata of {len(metadata)} bytes exceeds max_open_metadata")
        self._next_local_id = sid + 2
        self._last_local_id = sid
        s = StreamRecord(sid, True, self._peer_stream_window, self._limits.initial_stream_window, self._now)
        s.state = _NEXT[s.state][_I.SEND_OPEN_FIN if end_stream else _I.SEND_OPEN]
        self._streams[sid] = s
        self._queue_control(frames.encode_frame(FrameType.OPEN, _FIN if end_stream else 0, sid, metadata))
        self._grant_overdraft(s)  # its answer must not wait behind streams whose readers stalled
        if end_stream:
            self._enter_half_closed(s)
        return sid

    def send_data(self, stream_id: int, data, end_stream: bool = False) -> None:
        """Queue ``data`` (not copied: do not mutate it after) and optionally a FIN."""
        s = self._stream_for_send(stream_id)
        view = data if type(data) is memoryview else memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        n = len(view)
        if n:
            s.queue.append(view)
            self._send.add(s, n)
        if end_stream:
            s.fin_pending = True
        if not s.scheduled and ((n and s.send_window > 0) or (end_stream and not s.buffered)):
            s.scheduled = True
            self._active.append(s)

    def send_buffered(self, stream_id: int) -> int:
        """Outgoing bytes of the stream still queued (0 for a closed stream)."""
        s = self._streams.get(stream_id)
        return s.buffered if s is not None else 0

    def stream_paused(self, stream_id: int) -> bool:
        """True while the application should stop feeding the stream: a write took its queue
        above ``stream_send_high_water`` (or the session's above ``session_send_high_water``)
        and no ``StreamWritable`` has followed yet."""
        s = self._streams.get(stream_id)
        return s is not None and s.paused

    def end_stream(self, stream_id: int) -> None:
        """Half-close our direction after the data already queued."""
        self.send_data(stream_id, b"", end_stream=True)

    def reset_stream(self, stream_id: int, code: int = ErrorCode.NO_ERROR) -> None:
        """Abort both directions, dropping queued data. No-op for a stream already closed."""
        s = self._streams.get(stream_id)
        if s is None or self._closed:
            return
        self._queue_control(frames.encode_frame(FrameType.RESET, 0, stream_id, frames.encode_u32(code)))
        s.state = _NEXT[s.state][_I.SEND_RESET]
        self._drop_queue(s)
        self._forget(s)
        self._check_session_low()

    def consume(self, stream_id: int, n: int) -> None:
        """The application is done with ``n`` received bytes of the stream: grant credit.
        For a stream already closed, the bytes still go back to the session's window."""
        if n <= 0 or self._closed:
            return
        s = self._streams.get(stream_id)
        if s is not None:
            unconsumed = s.received - s.consumed
            if n > unconsumed:
                n = unconsumed
            if not n:
                return
            s.consumed += n
            s.last_activity = self._now
            if s.state == _OPEN or s.state == _HCL:  # the peer may still send
                credit = stream_credit(s.recv_limit, s.consumed, s.window)
                if credit:
                    self._policy.retune(s, s.consumed, self._now)
                    credit = s.consumed + s.window - s.recv_limit
                    s.recv_limit += credit
                    self._queue_control(frames.encode_frame(
                        FrameType.WINDOW_UPDATE, 0, stream_id, frames.encode_u32(credit)))
        else:
            unconsumed = self._recv_received - self._recv_consumed
            if n > unconsumed:
                n = unconsumed
        if n:
            self._credit_session(n)
            if self._recv_limit - self._recv_received <= self._limits.session_window >> 3:
                self._relieve_starved()

    def credit_discarded(self, n: int) -> None:
        """``n`` stream bytes the peer counted against the link window were discarded below
        the session (a QUIC stream reset drops what it had not delivered): they count as
        received and consumed, so that the window comes back."""
        if n <= 0 or self._closed:
            return
        if self._recv_received + n > self._recv_limit:  # more than the peer was allowed
            self._fail(ErrorCode.FLOW_CONTROL_ERROR, f"{n} discarded bytes exceed the session window "
                                                    f"({self._recv_limit - self._recv_received} left)")
            return
        self._recv_received += n
        self._credit_session(n)

    def _credit_session(self, n: int) -> None:
        """``n`` more received bytes are done with: grant credit as the policy says."""
        self._recv_consumed += n
        credit = session_credit(self._recv_limit, self._recv_received, self._recv_consumed,
                                self._limits.session_window)
        if credit and not self._closed:
            self._recv_limit += credit
            self._queue_control(frames.encode_frame(FrameType.WINDOW_UPDATE, 0, 0, frames.encode_u32(credit)))

    def _grant_overdraft(self, s: StreamRecord) -> bool:
        """Link credit for ``s`` if it reads but the peer has no link credit left (stalled
        streams hold it): :func:`tunnel.core.policy.overdraft_credit`. True if granted."""
        if s.consumed != s.received or self._closed or not (s.state == _OPEN or s.state == _HCL):
            return False
        credit = overdraft_credit(self._recv_limit, self._recv_received, self._recv_consumed,
                                  self._limits.session_window, s.recv_limit - s.received)
        if not credit:
            return False
        self._recv_limit += credit
        self._queue_control(frames.encode_frame(FrameType.WINDOW_UPDATE, 0, 0, frames.encode_u32(credit)))
        return True

    def _relieve_starved(self) -> None:
        """The peer's link credit ran (nearly) out: grant a reading stream some beyond it."""
        if not overdraft_credit(self._recv_limit, self._recv_received, self._recv_consumed,
                                self._limits.session_window, MAX_WINDOW):
            return
        for s in self._streams.values():
            if self._grant_overdraft(s):
                return

    def send_control(self, message: dict) -> None:
        """Queue one CONTROL frame (a JSON object)."""
        if self._closed:
            raise SessionClosed("session is closed")
        payload = encode_control(message, self._limits.max_control_size)
        self._queue_control(frames.encode_frame(FrameType.CONTROL, 0, 0, payload))

    def ping(self, now: float) -> None:
        """Send a PING; its answer yields ``PingAcknowledged`` and updates :attr:`rtt`."""
        self._now = now
        if self._closed:
            raise SessionClosed("session is closed")
        self._send_ping(now)

    def _send_ping(self, now: float) -> None:
        self._queue_control(frames.encode_frame(FrameType.PING, 0, 0, self._policy.new_ping(now)))

    def goaway(self, code: int = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """Open and accept no new streams; the open ones run to completion, then the session
        closes (``ConnectionClosed(NO_ERROR, "drained")``)."""
        if self._closed:
            return
        self._send_goaway(code, reason)
        self._check_drained()

    def _send_goaway(self, code: int, reason: str) -> None:
        if self._policy.send_goaway(code):
            self._queue_control(frames.encode_frame(
                FrameType.GOAWAY, 0, 0, frames.encode_goaway(self._last_peer_id, int(code), reason)))

    def close(self, code: int = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """Queue GOAWAY, reset every stream and report ``ConnectionClosed(remote=False)``."""
        if self._closed:
            return
        self._send_goaway(code, reason)
        self._terminate(code, reason, remote=False)

    def connection_lost(self, reason: str = "") -> None:
        """The transport under the session broke: report ``ConnectionClosed`` (remote)."""
        if not self._closed:
            self._terminate(ErrorCode.CONNECTION_RESET, reason or "connection lost", remote=True)

    def _fail(self, code: int, reason: str) -> None:
        """A link-level violation or timeout: GOAWAY(code), then closed; input ignored."""
        if self._closed:
            return
        self._send_goaway(code, reason)
        self._terminate(code, reason, remote=False)

    def _terminate(self, code: int, reason: str, remote: bool) -> None:
        self._closed = True
        events = self._events
        for s in list(self._streams.values()):
            self._drop_queue(s)
            s.state = _CLOSED
            events.append(StreamReset(s.id, code, remote))
            events.append(StreamClosed(s.id))
        self._streams.clear()
        self._active.clear()
        self._send.clear()
        self._policy.clear()
        events.append(ConnectionClosed(int(code), reason, remote))

    # --- timers -----------------------------------------------------------------------

    def next_timer(self) -> float | None:
        """When :meth:`handle_timer` should run next (None: no timer needed)."""
        if self._closed:
            return None
        return self._policy.next_deadline()

    def handle_timer(self, now: float) -> None:
        """Run what is due at ``now`` (harmless to call early or often)."""
        self._now = now
        if self._closed:
            return
        due = self._policy.keepalive_due(now)
        if due == KEEPALIVE_TIMEOUT:
            self._fail(ErrorCode.TIMEOUT, "keepalive timeout: the peer went silent")
            return
        if due == KEEPALIVE_PING:
            self._send_ping(now)
        expired = self._policy.expired_half_closed(now)
        for s in expired:
            if s.id in self._streams:
                self._stream_error(s, ErrorCode.TIMEOUT)
                if self._closed:
                    return
        if expired:
            self._check_session_low()
