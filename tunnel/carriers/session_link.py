"""The asyncio adapter between a byte :class:`~tunnel.carriers.pipe.Pipe` and the sans-IO
:class:`~tunnel.core.session.Session`, exposed as a :class:`~tunnel.carriers.base.Link`.

It feeds pipe bytes into the session with ``loop.time()``, hands the session's events to
the application through a :class:`~tunnel.carriers.dispatch.Dispatcher`, delivers each
stream's DATA once per received batch (the stream is the session's receiver, see
``Session.set_receiver``: one ``data_received``, or one ``data_received_many`` for several
payloads, per stream and batch, and no event object per frame), coalesces writes
into one ``loop.call_soon`` flush (one ``pipe.write`` batch per flush, nothing while the pipe
is paused, so backpressure flows into the per-stream send queues and from there into
``LinkStream.paused``) and keeps exactly one timer armed from ``session.next_timer()``.

The TLS WebSocket pipe lives in :mod:`tunnel.carriers.wss`, a plain TCP one (tests,
benchmarks) in :mod:`tunnel.carriers.tcp`.

The build compiles this module (``session_link.pxd`` gives the types). A compiled class cannot
derive from the ``Link`` ABC, so the link's code is in :class:`_SessionLinkBase` and
:class:`SessionLink` adds the interface; :class:`SessionLinkStream` is registered as a
``LinkStream``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from tunnel.carriers.base import Link, LinkHandler, LinkStream, StreamHandler
from tunnel.carriers.dispatch import Dispatcher
from tunnel.carriers.pipe import Pipe, PipeReceiver
from tunnel.core.events import (
    ConnectionClosed,
    ControlReceived,
    DataReceived,
    GoAwayReceived,
    SessionReady,
    StreamClosed,
    StreamEnded,
    StreamOpened,
    StreamReset,
    StreamWritable,
)
from tunnel.core.limits import DEFAULT_LIMITS, Limits
from tunnel.core.session import Session
from tunnel.core.session_state import Role
from tunnel.wire.constants import ErrorCode
from tunnel.wire.errors import LinkError, SessionClosed, StreamClosedError

__all__ = ["SessionLink", "SessionLinkStream"]

log = logging.getLogger(__name__)

#: Most bytes one flush hands to the pipe (one WebSocket message); more goes next flush.
FLUSH_BATCH = 1024 * 1024
#: After close, how long the pipe may take to flush (a dead peer never drains it) before it
#: is aborted (seconds).
CLOSE_GRACE = 5.0


class SessionLinkStream:
    """One stream of a :class:`SessionLink` (a :class:`~tunnel.carriers.base.LinkStream`)."""

    __slots__ = ("stream_id", "metadata", "handler", "_link", "_unconsumed", "_eof_sent", "_done")

    def __init__(self, link: "_SessionLinkBase", stream_id: int, metadata: bytes,
                 handler: StreamHandler | None) -> None:
        self._link = link
        self.stream_id = stream_id
        self.metadata = metadata
        self.handler = handler
        self._unconsumed = 0  # delivered to the handler, not yet consumed
        self._eof_sent = False
        self._done = False  # reset or closed: writes are dropped

    def write(self, data) -> None:
        if self._eof_sent:
            raise StreamClosedError(f"stream {self.stream_id}: write after write_eof")
        if self._done or not len(data):
            return
        try:
            self._link._session.send_data(self.stream_id, data)
        except (StreamClosedError, SessionClosed):
            # Reset by the peer (or the link closed) and the event is not dispatched yet.
            self._done = True
            return
        self._link._schedule_flush()

    def write_eof(self) -> None:
        if self._eof_sent:
            return
        self._eof_sent = True
        if self._done:
            return
        try:
            self._link._session.end_stream(self.stream_id)
        except StreamClosedError:
            self._done = True
            return
        self._link._schedule_flush()

    def reset(self, code: int = ErrorCode.NO_ERROR) -> None:
        if self._done:
            return
        self._done = True
        self._link._session.reset_stream(self.stream_id, code)
        self._release()
        self._link._schedule_flush()

    def consume(self, n: int) -> None:
        if n > self._unconsumed:
            n = self._unconsumed
        if n <= 0:
            return
        self._unconsumed -= n
        session = self._link._session
        session.consume(self.stream_id, n)
        if session.has_data_to_send:
            self._link._schedule_flush()

    def _release(self) -> None:
        """Reset: the handler will not consume what it still holds; free the session credit."""
        if self._unconsumed:
            n, self._unconsumed = self._unconsumed, 0
            self._link._session.consume(self.stream_id, n)

    @property
    def paused(self) -> bool:
        return not self._done and self._link._session.stream_paused(self.stream_id)

    @property
    def send_buffered(self) -> int:
        return self._link._session.send_buffered(self.stream_id)

    def __repr__(self) -> str:
        return f"<SessionLinkStream {self.stream_id} {self.metadata!r}>"


LinkStream.register(SessionLinkStream)


class _SessionLinkBase:
    """The code of :class:`SessionLink` (see the module docstring)."""

    __slots__ = (
        "_loop", "carrier", "_pipe", "_limits", "_session", "_dispatch_to", "_handshake_release", "_streams",
        "_flush_handle", "_timer_handle", "_timer_at", "_abort_handle", "_write_paused", "_pipe_closing",
        "_pipe_lost", "_ready", "_closed",
    )

    def __init__(self, pipe: Pipe, role: Role, limits: Limits = DEFAULT_LIMITS, carrier: str = "wss",
                 loop: asyncio.AbstractEventLoop | None = None,
                 on_handshake_done: Callable[[], None] | None = None) -> None:
        self._loop = loop if loop is not None else asyncio.get_running_loop()
        self.carrier = carrier
        self._pipe = pipe
        self._limits = limits
        self._session = Session(role, limits, now=self._loop.time())
        self._dispatch_to = Dispatcher(self._loop)
        self._handshake_release = on_handshake_done
        self._streams: dict[int, SessionLinkStream] = {}
        self._flush_handle: asyncio.Handle | None = None
        self._timer_handle: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._abort_handle: asyncio.TimerHandle | None = None
        self._write_paused = False
        self._pipe_closing = False
        self._pipe_lost = False
        self._ready = self._loop.create_future()
        self._closed = self._loop.create_future()
        pipe.set_receiver(self)
        self._schedule_flush()
        self._rearm_timer()

    # --- Link API ---------------------------------------------------------------------

    @property
    def session(self) -> Session:
        return self._session

    @property
    def peer_address(self) -> tuple:
        return getattr(self._pipe, "peer_address", ())

    @property
    def bytes_sent(self) -> int:
        return self._session.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self._session.bytes_received

    @property
    def rtt(self) -> float | None:
        return self._session.rtt

    @property
    def stream_count(self) -> int:
        return self._session.open_stream_count

    @property
    def peer_certificate(self) -> dict | None:
        return getattr(self._pipe, "peer_certificate", None)

    @property
    def is_closing(self) -> bool:
        return self._session.is_closing or self._pipe_closing or self._pipe_lost

    @property
    def ready(self) -> bool:
        return self._session.ready

    def set_handler(self, handler: LinkHandler) -> None:
        self._dispatch_to.set_handler(handler)

    async def wait_ready(self) -> None:
        """Return once both HELLOs are exchanged; raise LinkError if the link closes first."""
        await asyncio.shield(self._ready)

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    def open_stream(self, metadata: bytes, handler: StreamHandler) -> SessionLinkStream:
        if self.is_closing:
            raise SessionClosed("link is closing")
        if not self._session.ready:
            raise SessionClosed("link is not ready")
        sid = self._session.open_stream(metadata)
        stream = SessionLinkStream(self, sid, bytes(metadata), handler)
        self._streams[sid] = stream
        if not self._dispatch_to.holding:
            self._session.set_receiver(sid, stream)
        self._schedule_flush()
        return stream

    def send_control(self, message: dict) -> None:
        self._session.send_control(message)
        self._schedule_flush()

    def goaway(self, code: int = ErrorCode.NO_ERROR, reason: str = "") -> None:
        self._session.goaway(code, reason)
        self._schedule_flush()

    def close(self, code: int = ErrorCode.NO_ERROR, reason: str = "") -> None:
        if self._session.closed:
            # A GOAWAY that closed the session (nothing left to drain) may still be queued:
            # the flush sends it, then closes the pipe.
            self._schedule_flush()
            return
        self._session.close(code, reason)
        self._schedule_flush()

    def abort(self) -> None:
        """Drop the pipe at once, without GOAWAY."""
        self._session.connection_lost("aborted")
        self._pipe_closing = True
        self._pipe.abort()
        self._schedule_flush()

    # --- PipeReceiver -----------------------------------------------------------------

    def pipe_data_received(self, data) -> None:
        session = self._session
        session.receive_data(data, self._loop.time())
        # Deliver and dispatch now: payloads are views into ``data``, valid during this call only.
        received = session.pop_received()
        if received:
            self._deliver(received)
        self._process_events()
        if session.has_data_to_send or session.closed:
            self._schedule_flush()
        self._rearm_timer()

    def pipe_pause_writing(self) -> None:
        self._write_paused = True

    def pipe_resume_writing(self) -> None:
        self._write_paused = False
        self._schedule_flush()

    def pipe_connection_lost(self, exc: Exception | None) -> None:
        self._pipe_lost = True
        self._pipe_closing = True
        if not self._session.closed:
            self._session.connection_lost(f"connection lost: {exc}" if exc else "connection closed by peer")
        self._process_events()
        self._cancel_timer()
        if self._abort_handle is not None:
            self._abort_handle.cancel()
            self._abort_handle = None
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self._closed.done():
            self._closed.set_result(None)

    # --- internals --------------------------------------------------------------------

    def _schedule_flush(self) -> None:
        if self._flush_handle is None and not self._pipe_lost:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        session = self._session
        if not self._pipe_closing:
            if session.closed:
                buffers = session.data_to_send()  # the GOAWAY: send it even if paused
            elif not self._write_paused:
                buffers = session.data_to_send(FLUSH_BATCH)
            else:
                buffers = None
            if buffers:
                try:
                    self._pipe.write(buffers)
                except Exception:
                    log.exception("pipe write failed")
                    self._session.connection_lost("pipe write failed")
        self._process_events()
        if session.closed:
            self._close_pipe()
        elif not self._write_paused and session.has_data_to_send:
            self._schedule_flush()
        self._rearm_timer()

    def _close_pipe(self) -> None:
        if not self._pipe_closing:
            self._pipe_closing = True
            try:
                self._pipe.close()
            except Exception:
                log.exception("pipe close failed")
            if not self._pipe_lost:
                self._abort_handle = self._loop.call_later(CLOSE_GRACE, self._abort_pipe)
        self._cancel_timer()

    def _abort_pipe(self) -> None:
        self._abort_handle = None
        if not self._pipe_lost:
            log.warning("pipe did not drain within %.0f s of close; aborting it", CLOSE_GRACE)
            self._pipe.abort()

    def _cancel_timer(self) -> None:
        if self._timer_handle is not None:
            self._timer_handle.cancel()
            self._timer_handle = None
            self._timer_at = None

    def _rearm_timer(self) -> None:
        at = self._session.next_timer()
        if at is None:
            self._cancel_timer()
            return
        # Keep an earlier timer: it fires, finds nothing due and re-arms (cheaper than
        # rescheduling on every received chunk as the keepalive deadline moves).
        if self._timer_handle is not None and self._timer_at <= at:
            return
        self._cancel_timer()
        self._timer_at = at
        self._timer_handle = self._loop.call_at(at + 0.001, self._on_timer)

    def _on_timer(self) -> None:
        self._timer_handle = None
        self._timer_at = None
        self._session.handle_timer(self._loop.time())
        self._process_events()
        if self._session.has_data_to_send or self._session.closed:
            self._schedule_flush()
        self._rearm_timer()

    def _deliver(self, received: list) -> None:
        """The DATA of streams the session collects for us (their receiver is the stream):
        one handler call per stream and batch, so that a handler writing to a socket writes
        the batch at once."""
        for stream, payloads in received:
            n = 0
            for data in payloads:
                n += len(data)
            handler = stream.handler
            if stream._done or handler is None:
                # Nobody will consume these (reset meanwhile): credit them back.
                self._session.consume(stream.stream_id, n)
                continue
            stream._unconsumed += n
            try:
                if len(payloads) == 1:
                    handler.data_received(payloads[0])
                else:
                    handler.data_received_many(payloads)
            except Exception:
                self._dispatch_to.stream_failed(stream, "data_received")

    def _process_events(self) -> None:
        events = self._session.pop_events()
        if not events:
            return
        for event in events:
            kind = type(event)
            if kind is SessionReady:
                if not self._ready.done():
                    self._ready.set_result(None)
                continue
            if kind is ConnectionClosed:
                if not self._ready.done():
                    self._ready.set_exception(LinkError(f"link closed before it was ready: {event.reason}"))
                    self._ready.exception()  # retrieved: no "never retrieved" warning
            if self._dispatch_to.holding:
                if kind is DataReceived and type(event.data) is not bytes:
                    event = DataReceived(event.stream_id, bytes(event.data))
                self._dispatch_to.hold(self._dispatch, event)
            else:
                self._dispatch(event)

    def _dispatch(self, event) -> None:
        kind = type(event)
        to = self._dispatch_to
        if kind is DataReceived:
            stream = self._streams.get(event.stream_id)
            n = len(event.data)
            if stream is None or stream._done or stream.handler is None:
                # Nobody will consume these (stream refused or reset): credit them back.
                self._session.consume(event.stream_id, n)
                return
            stream._unconsumed += n
            to.stream_call(stream, stream.handler.data_received, event.data)
        elif kind is StreamOpened:
            stream = SessionLinkStream(self, event.stream_id, event.metadata, None)
            self._streams[event.stream_id] = stream
            stream.handler = to.open(stream)
            if stream.handler is not None and not stream._done:
                self._session.set_receiver(event.stream_id, stream)
        elif kind is StreamEnded:
            stream = self._streams.get(event.stream_id)
            if stream is not None and stream.handler is not None and not stream._done:
                to.stream_call(stream, stream.handler.eof_received)
        elif kind is StreamWritable:
            stream = self._streams.get(event.stream_id)
            if stream is not None and stream.handler is not None and not stream._done:
                to.stream_call(stream, stream.handler.writable)
        elif kind is StreamReset:
            stream = self._streams.get(event.stream_id)
            if stream is not None and not stream._done:
                stream._done = True
                stream._release()
                if stream.handler is not None:
                    to.stream_done(stream, stream.handler.reset_received, event.code)
        elif kind is StreamClosed:
            stream = self._streams.pop(event.stream_id, None)
            if stream is not None:
                stream._done = True
                if stream.handler is not None:
                    to.stream_done(stream, stream.handler.closed)
        elif kind is ControlReceived:
            to.control(event.message)
        elif kind is GoAwayReceived:
            log.info("peer sent GOAWAY (code %s): %s", event.code, event.reason)
        elif kind is ConnectionClosed:
            to.closed(event.code, event.reason)


class SessionLink(_SessionLinkBase, Link, PipeReceiver):
    """A :class:`~tunnel.carriers.base.Link` over a byte pipe, driven by a :class:`Session`."""
