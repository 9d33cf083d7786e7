"""One tunneled stream of a QUIC link (:class:`QuicLinkStream`), riding its own bidirectional
QUIC stream (docs/PROTOCOL.md, "QUIC mapping"; the rules it follows are described in
:mod:`tunnel.carriers.quic.link`).

The stream and its :class:`~tunnel.carriers.quic.link.QuicLink` are one unit split in two
modules: the stream reads and updates the link's own state (its send queue bound, credit,
watermarks, dispatch) as it did when both shared a module.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

from tunnel.carriers.base import LinkStream, StreamHandler
from tunnel.carriers.quic.compat import (
    acked_offset,
    granted_offset,
    received_offset,
    sent_offset,
    unsent_bytes,
    written_offset,
)
from tunnel.core.policy import stream_credit
from tunnel.wire.constants import ErrorCode, FrameType
from tunnel.wire.errors import StreamClosedError

if TYPE_CHECKING:
    from tunnel.carriers.quic.link import QuicLink

__all__ = ["QuicLinkStream"]


class QuicLinkStream(LinkStream):
    """One tunneled stream riding its own bidirectional QUIC stream."""

    __slots__ = ("link", "stream_id", "metadata", "handler", "_qs", "_queue", "buffered", "paused",
                 "_eof_pending", "_eof_sent", "_eof_received", "_reset", "_closed", "_rx_consumed",
                 "_rx_seen", "window", "epoch_at", "epoch_consumed", "_local", "last_activity",
                 "_half_closed", "_acked_mark")

    def __init__(self, link: QuicLink, stream_id: int, metadata: bytes, qs, local: bool) -> None:
        self.link = link
        self.stream_id = stream_id
        self.metadata = metadata
        self.handler: StreamHandler | None = None
        self._qs = qs  # aioquic's QuicStream (kept: aioquic forgets finished streams)
        self._queue: collections.deque = collections.deque()
        self.buffered = 0  # bytes in _queue (SendWatermarks keeps it)
        self.paused = False  # SendWatermarks keeps it
        self._eof_pending = False  # write_eof called, FIN not yet handed to aioquic
        self._eof_sent = False
        self._eof_received = False
        self._reset = False
        self._closed = False
        self._rx_consumed = 0  # stream offset up to which credit may be granted
        self._rx_seen = 0  # stream offset received so far (delivered or skipped)
        self.window = link.limits.initial_stream_window  # grows: LinkPolicy.retune
        self.epoch_at = link._loop.time()
        self.epoch_consumed = 0
        self._local = local
        self.last_activity = 0.0  # data in, out, consumed or acknowledged (while half-closed)
        self._half_closed = False
        self._acked_mark = 0  # peer-acknowledged send offset at the last half-close check

    # --- LinkStream API ------------------------------------------------------------

    def write(self, data) -> None:
        if self._eof_pending or self._eof_sent:
            raise StreamClosedError(f"stream {self.stream_id}: write after write_eof")
        n = len(data)
        if not n or self._reset or self._closed or self.link._closed:
            return  # a write racing the reset or the link's end: dropped
        self._queue.append(data)
        link = self.link
        link._watermarks.add(self, n)
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
            self.last_activity = link._loop.time()
        qs = self._qs
        if stream_credit(granted_offset(qs), self._rx_consumed, self.window):
            link._policy.retune(self, self._rx_consumed, link._loop.time())
        if link._conn.grant_stream(qs, self._rx_consumed, self.window) | link._conn.grant_connection(
                link._rx_consumed, link._session_window):
            link._schedule_transmit()
        link.relieve_starved()

    # --- introspection -------------------------------------------------------------

    @property
    def send_buffered(self) -> int:
        """Outgoing bytes held in memory: our queue plus aioquic's unacknowledged buffer."""
        return self.buffered + written_offset(self._qs) - acked_offset(self._qs)

    @property
    def receive_unconsumed(self) -> int:
        """Received bytes (delivered or buffered by aioquic) not yet consumed."""
        return received_offset(self._qs) - self._rx_consumed

    # --- carrier internals ---------------------------------------------------------

    def _feed(self) -> bool:
        """Hand aioquic what the peer's credit allows; return True if anything moved."""
        if self._reset:
            return False
        qs = self._qs
        sender = qs.sender
        moved = False
        link = self.link
        if self.buffered:
            written = written_offset(qs)
            limits = link.limits
            room = min(qs.max_stream_data_remote, sent_offset(qs) + limits.quic_unsent_per_stream) - written
            link_room = limits.quic_unsent_per_link - (link._tx_fed - link._conn.remote_data_used)
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
                link._watermarks.remove(self, take)
                data = parts[0] if len(parts) == 1 else b"".join(parts)
                last = not queue and self._eof_pending
                sender.write(data, end_stream=last)
                if last:
                    self._eof_pending = False
                    self._eof_sent = True
                link.bytes_sent += take
                link._tx_fed += take
                if self._half_closed:
                    self.last_activity = link._loop.time()
                moved = True
        if self._eof_pending and not self.buffered:
            sender.write(b"", end_stream=True)
            self._eof_pending = False
            self._eof_sent = True
            moved = True
        if moved:
            sender.buffer_is_empty = False
        return moved

    def _after_feed(self) -> None:
        link = self.link
        if self.paused and link._watermarks.resumable(self) and self.handler is not None:
            link._dispatch.stream_call(self, self.handler.writable)
        if self._eof_sent and not self._closed:
            self._maybe_closed()
            if not self._closed and not self._half_closed:
                link._enter_half_closed(self)

    def _data(self, data: bytes, fin: bool) -> None:
        link = self.link
        n = len(data)
        self._rx_seen += n
        if n:
            ping = link._policy.data_received(n, link._loop.time())
            if ping is not None:
                link._send_frame(FrameType.PING, 0, ping)
        if self._half_closed:
            self.last_activity = link._loop.time()
        if self._reset or self.handler is None:
            self._skip(len(data))
        elif data:
            link.bytes_received += len(data)
            link._dispatch.stream_call(self, self.handler.data_received, data)
        if fin and not self._reset and not self._eof_received:
            self._eof_received = True
            if self.handler is not None:
                link._dispatch.stream_call(self, self.handler.eof_received)
            if self._closed or self._reset:
                return
            self._maybe_closed()
            if not self._closed and not self._half_closed:
                link._enter_half_closed(self)

    def _skip(self, n: int) -> None:
        """Bytes the application never sees: give their credit back at once."""
        if n:
            self._rx_consumed += n
            link = self.link
            link._rx_consumed += n
            link._conn.grant_stream(self._qs, self._rx_consumed, self.window)
            link._conn.grant_connection(link._rx_consumed, link._session_window)

    def _abort(self, code: int, notify: bool) -> None:
        """Reset both directions (ours, or in answer to the peer's RESET/STOP_SENDING)."""
        self._reset = True
        link = self.link
        self._queue.clear()
        link._watermarks.forget(self)
        link._tx_fed -= unsent_bytes(self._qs)  # never to be sent
        if not link._closed:
            link._reset_quic_stream(self.stream_id, code, stop=not self._eof_received)
        if notify and self.handler is not None:
            link._dispatch.stream_done(self, self.handler.reset_received, code)
        self._finish(notify)

    def _release_rest(self) -> None:
        """Unconsumed or late bytes of a finished stream stop counting against the link."""
        leftover = max(received_offset(self._qs), self._rx_seen) - self._rx_consumed
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
            link._policy.peer_stream_closed()
        link._sending.discard(self)
        link._watermarks.forget(self)
        if self._half_closed:
            self._half_closed = False
            link._policy.forget_half_closed(self)
        self._release_rest()
        handler = self.handler
        if handler is not None:
            if direct:
                link._dispatch.stream_done(self, handler.closed)
            else:
                link._loop.call_soon(link._dispatch.stream_done, self, handler.closed)
        link._check_drained()
