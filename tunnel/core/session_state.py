"""What the multiplexer (:mod:`tunnel.core.session`) keeps: the roles, the stream state
machine as a table (:data:`TRANSITIONS`, ``(state, input) -> new state``; anything missing is
a violation), each stream's record (:class:`StreamRecord`) and the link's own state with what
the application may read of it (:class:`SessionState`, the base of
:class:`tunnel.core.session.Session`, which holds the behaviour).
"""

from __future__ import annotations

from collections import deque
from enum import IntEnum

from tunnel import codec as frames
from tunnel.core.events import Event
from tunnel.core.limits import Limits
from tunnel.core.policy import LinkPolicy, SendWatermarks
from tunnel.wire.constants import MIN_FRAME_SIZE

__all__ = ["Role", "SessionState", "StreamInput", "StreamRecord", "StreamState", "TRANSITIONS"]


class Role(IntEnum):
    #: The dialling side; opens odd stream ids.
    AGENT = 1
    #: The accepting side; opens even stream ids.
    RELAY = 2


class StreamState(IntEnum):
    IDLE = 0
    OPEN = 1
    HALF_CLOSED_LOCAL = 2
    HALF_CLOSED_REMOTE = 3
    CLOSED = 4


class StreamInput(IntEnum):
    SEND_OPEN = 0
    SEND_OPEN_FIN = 1
    RECV_OPEN = 2
    RECV_OPEN_FIN = 3
    SEND_DATA = 4
    RECV_DATA = 5
    SEND_FIN = 6
    RECV_FIN = 7
    SEND_RESET = 8
    RECV_RESET = 9
    RECV_WINDOW_UPDATE = 10


_S = StreamState
_I = StreamInput

#: The stream state machine: ``(state, input) -> new state``. A pair that is missing is a
#: violation: by the peer (``RECV_*``: STREAM_CLOSED for data after FIN, else PROTOCOL_ERROR)
#: or by the application (``SEND_*``: :class:`tunnel.wire.errors.StreamClosedError`).
TRANSITIONS: dict[tuple[StreamState, StreamInput], StreamState] = {
    (_S.IDLE, _I.SEND_OPEN): _S.OPEN,
    (_S.IDLE, _I.SEND_OPEN_FIN): _S.HALF_CLOSED_LOCAL,
    (_S.IDLE, _I.RECV_OPEN): _S.OPEN,
    (_S.IDLE, _I.RECV_OPEN_FIN): _S.HALF_CLOSED_REMOTE,
    (_S.OPEN, _I.SEND_DATA): _S.OPEN,
    (_S.OPEN, _I.RECV_DATA): _S.OPEN,
    (_S.OPEN, _I.SEND_FIN): _S.HALF_CLOSED_LOCAL,
    (_S.OPEN, _I.RECV_FIN): _S.HALF_CLOSED_REMOTE,
    (_S.OPEN, _I.SEND_RESET): _S.CLOSED,
    (_S.OPEN, _I.RECV_RESET): _S.CLOSED,
    (_S.OPEN, _I.RECV_WINDOW_UPDATE): _S.OPEN,
    (_S.HALF_CLOSED_LOCAL, _I.RECV_DATA): _S.HALF_CLOSED_LOCAL,
    (_S.HALF_CLOSED_LOCAL, _I.RECV_FIN): _S.CLOSED,
    (_S.HALF_CLOSED_LOCAL, _I.SEND_RESET): _S.CLOSED,
    (_S.HALF_CLOSED_LOCAL, _I.RECV_RESET): _S.CLOSED,
    (_S.HALF_CLOSED_LOCAL, _I.RECV_WINDOW_UPDATE): _S.HALF_CLOSED_LOCAL,
    (_S.HALF_CLOSED_REMOTE, _I.SEND_DATA): _S.HALF_CLOSED_REMOTE,
    (_S.HALF_CLOSED_REMOTE, _I.SEND_FIN): _S.CLOSED,
    (_S.HALF_CLOSED_REMOTE, _I.SEND_RESET): _S.CLOSED,
    (_S.HALF_CLOSED_REMOTE, _I.RECV_RESET): _S.CLOSED,
    (_S.HALF_CLOSED_REMOTE, _I.RECV_WINDOW_UPDATE): _S.HALF_CLOSED_REMOTE,
}

_IDLE = int(_S.IDLE)


class StreamRecord:
    """One stream as the session keeps it (the fields its ``.pxd`` types)."""

    __slots__ = (
        "id", "local", "state", "queue", "buffered", "fin_pending", "send_window",
        "recv_limit", "received", "consumed", "window", "epoch_at", "epoch_consumed", "scheduled",
        "paused", "last_activity", "turn_left", "receiver", "inbox",
    )

    def __init__(self, stream_id: int, local: bool, send_window: int, recv_window: int, now: float) -> None:
        self.id = stream_id
        self.local = local
        self.state = _IDLE
        self.queue: deque = deque()  # memoryviews of the application's data, uncopied
        self.buffered = 0  # bytes in queue
        self.fin_pending = False  # end_stream called; FIN goes out after the queue
        self.send_window = send_window  # credit the peer gave us
        self.recv_limit = recv_window  # stream offset the peer may send up to
        self.received = 0  # stream offset received
        self.consumed = 0  # stream offset the application consumed
        self.window = recv_window  # our receive window for this stream (grows: policy.retune)
        self.epoch_at = now  # window auto-tuning: start of the epoch ...
        self.epoch_consumed = 0  # ... and what was consumed then
        self.scheduled = False  # in Session._active
        self.paused = False  # reported paused; waits for StreamWritable
        self.last_activity = now
        self.turn_left = 0  # rest of a quantum cut short by max_bytes: resumed first
        self.receiver = None  # set_receiver: DATA goes to pop_received, not DataReceived events
        self.inbox: list | None = None  # payloads for the receiver since the last pop_received


class SessionState:
    """One link's multiplexer state: its fields (typed in the ``.pxd``) and the properties
    that read them. :class:`tunnel.core.session.Session` adds what changes them."""

    def __init__(self, role: Role, limits: Limits, now: float) -> None:
        self._role = Role(role)
        self._limits = limits
        self._now = now
        self._local_parity = 1 if self._role == Role.AGENT else 0
        self._decoder = frames.FrameDecoder(limits.max_frame_size)
        self._events: list[Event] = []
        self._control: deque = deque()
        self._control_bytes = 0
        self._streams: dict[int, StreamRecord] = {}
        self._active: deque = deque()  # streams with data (or a FIN) and credit, round-robin
        self._policy = LinkPolicy(limits, now)
        self._send = SendWatermarks(limits)
        self._next_local_id = 1 if self._role == Role.AGENT else 2
        self._last_local_id = 0
        self._last_peer_id = 0
        # Peer's HELLO.
        self._hello_received = False
        self._version: int | None = None
        self._peer_stream_window = 0
        self._peer_max_frame = MIN_FRAME_SIZE
        self._send_session_window = 0
        # Our receive side, as byte counts across all streams.
        self._recv_limit = limits.session_window  # what the peer may send in all
        self._recv_received = 0
        self._recv_consumed = 0
        self._closed = False
        self._inbox_streams: list[StreamRecord] = []  # streams with payloads for pop_received
        self.bytes_sent = 0
        self.bytes_received = 0

    # --- properties -------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Both HELLOs exchanged and the link not closed: streams may be opened."""
        return self._hello_received and not self._closed

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def version(self) -> int | None:
        return self._version

    @property
    def open_stream_count(self) -> int:
        return len(self._streams)

    @property
    def rtt(self) -> float | None:
        return self._policy.rtt

    @property
    def goaway_sent(self) -> bool:
        return self._policy.goaway_sent

    @property
    def goaway_received(self) -> bool:
        return self._policy.goaway_received

    @property
    def is_closing(self) -> bool:
        """GOAWAY sent or received, or closed."""
        return self._closed or self._policy.going_away

    @property
    def has_data_to_send(self) -> bool:
        """True if :meth:`data_to_send` would return something now."""
        if self._control:
            return True
        if self._closed or not self._active:
            return False
        return self._send_session_window > 0 or any(not s.buffered for s in self._active)

    @property
    def send_buffered_total(self) -> int:
        """Outgoing stream bytes queued across all streams."""
        return self._send.total

    @property
    def received_unconsumed(self) -> int:
        """Received DATA bytes the application has not consumed yet (bounded by the window)."""
        return self._recv_received - self._recv_consumed

    def stream_ids(self) -> list[int]:
        """Ids of the streams still tracked (not yet closed both ways)."""
        return list(self._streams)
