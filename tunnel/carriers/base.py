"""The interface every carrier (TLS WebSocket, QUIC) implements.

Relay and agent code only ever see these types, never which carrier moves the bytes:

- a :class:`Link` is one live connection between an agent and the relay;
- a :class:`LinkStream` is one tunneled TCP connection on that link;
- the application supplies a :class:`LinkHandler` per link and a :class:`StreamHandler` per
  stream, and the link calls them (from the event loop, never re-entrantly from a method the
  application called; :mod:`tunnel.carriers.dispatch` holds the rules every carrier follows).

Backpressure contract, both ways:

- *Sending*: ``LinkStream.write`` queues without blocking. When ``stream.paused`` turns true
  the application stops reading its source (the TCP socket); ``StreamHandler.writable`` tells
  it to read again. Writing after ``write_eof`` raises ``StreamClosedError``; a write that
  races a reset (the peer's, or the link's end) is dropped silently: the reset is on its way.
- *Receiving*: the link counts every byte passed to ``StreamHandler.data_received`` against
  the stream's window until the application calls ``LinkStream.consume(n)``: call it once the
  bytes have left your buffers (written to a TCP transport that is not paused). Credit
  flows back to the peer only then, so memory per stream is bounded by its window.
"""

from __future__ import annotations

import abc

from tunnel.wire.constants import ErrorCode


class StreamHandler:
    """Receives the events of one stream. Override what you need."""

    def data_received(self, data: bytes | memoryview) -> None:
        """Bytes from the peer; ``data`` may be a view valid only during this call."""

    def data_received_many(self, pieces: list) -> None:
        """Several pieces of the peer's bytes that arrived together, in order, in one call
        instead of one ``data_received`` each (a handler that writes them to a socket can
        write them at once). Same rules as ``data_received``; the default calls it for each."""
        for data in pieces:
            self.data_received(data)

    def eof_received(self) -> None:
        """The peer half-closed: no more data will arrive."""

    def reset_received(self, code: int) -> None:
        """The stream was reset (by the peer, or locally for a protocol or timeout reason)."""

    def writable(self) -> None:
        """Queued outgoing bytes drained below the low-water mark: resume reading the source."""

    def closed(self) -> None:
        """Both directions are over; the stream is forgotten by the link."""


class LinkStream(abc.ABC):
    """One tunneled stream."""

    stream_id: int
    #: The OPEN payload: the resource name the relay asks the agent to reach.
    metadata: bytes
    handler: StreamHandler

    @abc.abstractmethod
    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data``; it is sent as credit allows. The caller must not mutate it after.
        Raises ``StreamClosedError`` after ``write_eof``; dropped after a reset."""

    @abc.abstractmethod
    def write_eof(self) -> None:
        """Half-close our direction (FIN) after the queued data."""

    @abc.abstractmethod
    def reset(self, code: int = ErrorCode.NO_ERROR) -> None:
        """Abort both directions at once, discarding queued data."""

    @abc.abstractmethod
    def consume(self, n: int) -> None:
        """The application is done with ``n`` received bytes: grant the peer credit."""

    @property
    @abc.abstractmethod
    def paused(self) -> bool:
        """True while queued outgoing bytes are above the high-water mark."""


class LinkHandler:
    """Receives the events of one link. Override what you need."""

    def stream_opened(self, stream: LinkStream) -> StreamHandler | None:
        """The peer opened ``stream``. Return its handler, or None after resetting it."""
        stream.reset(ErrorCode.REFUSED)
        return None

    def control_received(self, message: dict) -> None:
        """A CONTROL message (a JSON object with a ``type``) from the peer."""

    def link_closed(self, code: int, reason: str) -> None:
        """The link is over (closed by either side, timed out or broken)."""


class Link(abc.ABC):
    """A connection between an agent and the relay over some carrier."""

    #: Which carrier moves the bytes: "wss", "quic" (or "tcp" in tests). Shown to users as
    #: the link's "transport".
    carrier: str
    #: The peer's (host, port) as this side sees it.
    peer_address: tuple
    #: Payload bytes moved, for ``resources list --extended``.
    bytes_sent: int = 0
    bytes_received: int = 0
    #: The last keepalive round trip (seconds), None before the first.
    rtt: float | None = None

    @abc.abstractmethod
    def set_handler(self, handler: LinkHandler) -> None:
        """Install the link's handler; events wait until one is installed."""

    @abc.abstractmethod
    def open_stream(self, metadata: bytes, handler: StreamHandler) -> LinkStream:
        """Open a stream towards the peer (raises ``UsageError`` if the link is closing)."""

    @abc.abstractmethod
    def send_control(self, message: dict) -> None:
        """Send one CONTROL message."""

    @abc.abstractmethod
    def goaway(self, code: int = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """Open and accept no new streams; let the open ones finish."""

    @abc.abstractmethod
    def close(self, code: int = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """Close now: every stream is reset, ``link_closed`` follows."""

    @abc.abstractmethod
    async def wait_closed(self) -> None:
        """Return once the link is closed and its transport released."""

    @property
    @abc.abstractmethod
    def is_closing(self) -> bool:
        """True once close or goaway has begun, from either side."""

    #: Given by the listener that accepted the link (relay side): frees its handshake slot
    #: and cancels the handshake deadline.
    _handshake_release = None

    def handshake_done(self) -> None:
        """Relay side: authentication finished, the link is no longer a pending handshake."""
        callback, self._handshake_release = self._handshake_release, None
        if callback is not None:
            callback()

    @property
    def stream_count(self) -> int:
        """Streams currently open on this link."""
        return 0

    @property
    def peer_certificate(self) -> dict | None:
        """The certificate the peer presented, verified, as ``ssl.SSLSocket.getpeercert()``
        gives it (a TLS client certificate); None when it presented none."""
        return None
