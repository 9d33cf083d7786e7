"""One agent-relay link over QUIC: the core's :class:`~tunnel.carriers.session_link.SessionLink`
on a :class:`QuicPipe`.

Everything the link decides (HELLO, keepalive, PING, credit, admission, going away, floods)
is :class:`tunnel.core.session.Session`'s, as on WSS; how its frames ride QUIC streams is
:class:`tunnel.core.quic_session.QuicSession`'s. What is left here is I/O: datagrams in from the
UDP socket, out in one batch per loop iteration, and QUIC's timer on the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from tunnel.carriers.pipe import Pipe, PipeReceiver
from tunnel.carriers.session_link import SessionLink
from tunnel.core.limits import Limits
from tunnel.core.quic_session import ConnectionIdIssued, ConnectionIdRetired, QuicClosed, QuicSession
from tunnel.core.session_state import Role
from tunnel.wire.constants import ErrorCode

__all__ = ["QuicLink", "QuicPipe"]

#: Bytes handed to the engine and not sent, on the control stream and on the others, above which
#: the link stops writing (the core queues the rest, and closes a link whose peer makes it queue
#: too many answers) and below which it writes again.
CONTROL_BACKLOG_HIGH = 256 * 1024
CONTROL_BACKLOG_LOW = 64 * 1024
UNSENT_HIGH = 1024 * 1024
UNSENT_LOW = 256 * 1024


class QuicPipe(Pipe):
    """The UDP side of a QUIC link: ``send([(datagram, addr), ...])``; ``on_terminated()`` once
    the connection is gone, ``on_cid_issued/retired(cid)`` for the server's demultiplexing."""

    def __init__(self, session: QuicSession, send: Callable, peer_address: tuple,
                 loop: asyncio.AbstractEventLoop, *, on_terminated: Callable[[], None] | None = None,
                 on_cid_issued: Callable[[bytes], None] | None = None,
                 on_cid_retired: Callable[[bytes], None] | None = None) -> None:
        self.session = session
        self.peer_address = peer_address
        self._send = send
        self._loop = loop
        self._on_terminated = on_terminated
        self._on_cid_issued = on_cid_issued
        self._on_cid_retired = on_cid_retired
        self._receiver: PipeReceiver | None = None
        self._tx_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._over = False
        self._paused = False  # the control stream's backlog stopped the link's writes
        #: Why the connection ended (for logs), None while it is up.
        self.error: str | None = None

    # --- Pipe ----------------------------------------------------------------------

    def set_receiver(self, receiver: PipeReceiver) -> None:
        self._receiver = receiver

    def write(self, buffers) -> None:
        self.session.send_frames(buffers)
        self._schedule_transmit()

    def close(self) -> None:
        """CONNECTION_CLOSE once the last control frames (the GOAWAY) are sent and a QUIC PING
        after them is acknowledged, or after a short flush timeout."""
        self.session.close(None, "", self._loop.time())
        self._input_done()

    def abort(self) -> None:
        self.session.abort(ErrorCode.CONNECTION_RESET, "aborted")
        self._transmit()
        self._ended(ErrorCode.CONNECTION_RESET, "aborted")

    # --- from the socket -----------------------------------------------------------

    def start(self, addr) -> None:
        """Client: send the first flight towards ``addr``."""
        self.session.connect(addr, self._loop.time())
        self._transmit()

    def datagram_received(self, data: bytes, addr) -> None:
        if not self._over:
            self.session.receive_datagram(data, addr, self._loop.time())
            self._input_done()

    def unreachable(self, exc: Exception) -> None:
        """ICMP port unreachable before the handshake: nobody listens there, fail fast."""
        if not self.session.handshake_complete and not self._over:
            self.session.abort(ErrorCode.CONNECT_FAILED, "UDP unreachable")
            self._ended(ErrorCode.CONNECT_FAILED, f"UDP unreachable: {exc}")

    def connection_lost(self, exc) -> None:
        """The UDP socket is gone: the link is over."""
        self._ended(ErrorCode.CONNECTION_RESET, f"socket closed: {exc}" if exc else "socket closed")

    # --- internals -----------------------------------------------------------------

    def _input_done(self) -> None:
        self._deliver()
        self._schedule_transmit()

    def _schedule_transmit(self) -> None:
        """One ``datagrams_to_send`` per loop iteration, after everything the iteration
        received and everything the link wrote in it."""
        if not self._tx_scheduled and not self._over:
            self._tx_scheduled = True
            self._loop.call_soon(self._transmit)

    def _deliver(self) -> None:
        """What the QUIC session produced for the link (frames, credit back, events), at once:
        nothing of ours may go out before the link has seen it."""
        session = self.session
        receiver = self._receiver
        if receiver is not None:
            discarded = session.pop_discarded()
            if discarded:
                receiver.session.credit_discarded(discarded)
            data = session.pop_frames()
            if data:
                receiver.pipe_data_received(data)
        self._events()

    def _events(self) -> None:
        for event in self.session.pop_events():
            kind = type(event)
            if kind is ConnectionIdIssued:
                if self._on_cid_issued is not None:
                    self._on_cid_issued(event.connection_id)
            elif kind is ConnectionIdRetired:
                if self._on_cid_retired is not None:
                    self._on_cid_retired(event.connection_id)
            elif kind is QuicClosed:
                self._ended(event.code, event.reason)

    def _transmit(self) -> None:
        self._tx_scheduled = False
        if self._over:
            return
        now = self._loop.time()
        datagrams = self.session.datagrams_to_send(now)
        if datagrams:
            self._send(datagrams)
        self._deliver()
        if self._over:
            return
        self._check_backlog()
        at = self.session.next_timer(now)
        if at != self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(at, self._on_timer) if at is not None else None
            self._timer_at = at

    def _check_backlog(self) -> None:
        session, receiver = self.session, self._receiver
        if not self._paused:
            self._paused = session.control_backlog() > CONTROL_BACKLOG_HIGH or session.unsent() > UNSENT_HIGH
            if self._paused and receiver is not None:
                receiver.pipe_pause_writing()
        elif session.control_backlog() <= CONTROL_BACKLOG_LOW and session.unsent() <= UNSENT_LOW:
            self._paused = False
            if receiver is not None:
                receiver.pipe_resume_writing()

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        self.session.handle_timer(self._loop.time())
        self._input_done()

    def _ended(self, code: int, reason: str) -> None:
        """The connection is over: tell the link (with our code), once."""
        if self._over:
            return
        self._over = True
        self.error = reason
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        receiver = self._receiver
        if receiver is not None:
            receiver.close(code, reason)
            receiver.pipe_connection_lost(None)
        callback, self._on_terminated = self._on_terminated, None
        if callback is not None:
            callback()


class QuicLink(SessionLink):
    """A :class:`~tunnel.carriers.base.Link` over one QUIC connection; ``error``: why it ended."""

    def __init__(self, pipe: QuicPipe, role: Role, limits: Limits, loop: asyncio.AbstractEventLoop,
                 on_handshake_done: Callable[[], None] | None = None) -> None:
        super().__init__(pipe, role, limits, carrier="quic", loop=loop, on_handshake_done=on_handshake_done)

    @property
    def error(self) -> str | None:
        return self._pipe.error

    @property
    def datagram_size(self) -> int:
        """The largest UDP payload this side sends on the link."""
        return self._pipe.session.datagram_size
