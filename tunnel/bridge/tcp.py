"""Joins one TCP connection to one tunneled stream, both directions, with backpressure.

Used on both ends: the relay bridges each integration worker's connection to a new stream,
the agent bridges each stream it accepts to a connection it dials to the private service.

- TCP → stream: bytes read are queued on the stream; while the stream is ``paused`` the
  socket is not read (``StreamHandler.writable`` resumes it).
- stream → TCP: bytes are written to the socket and credit is returned with ``consume``
  only while the socket's write buffer is below its high-water mark, so a slow TCP peer
  stalls its stream's window and nothing else.
- A FIN travels as a half-close either way; a TCP reset becomes a stream RESET
  (``CONNECTION_RESET``) and a stream RESET becomes a TCP reset (RST via SO_LINGER 0).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct

from tunnel.carriers.base import LinkStream, StreamHandler
from tunnel.carriers.pipe import set_nodelay
from tunnel.wire.constants import ErrorCode

log = logging.getLogger("tunnel.bridge.tcp")

_LINGER_RST = struct.pack("ii", 1, 0)


class TcpBridge(asyncio.Protocol):
    """asyncio protocol of the TCP side; :func:`stream_handler` gives its stream side.

    The stream may be attached after the TCP connection (relay: connection first) or the TCP
    connection after the stream (agent: stream first, then the dial); whatever arrives on the
    stream before the dial completes waits here, still counted against the stream's window.
    """

    __slots__ = ("stream", "transport", "_pending", "_unconsumed", "_tcp_write_paused",
                 "_stream_eof", "_tcp_eof", "_done", "on_done")

    def __init__(self, stream: LinkStream | None = None) -> None:
        self.stream = stream
        self.transport: asyncio.Transport | None = None
        self._pending: list = []  # stream bytes received before the TCP side exists
        self._unconsumed = 0  # bytes written to TCP while its buffer was full
        self._tcp_write_paused = False
        self._stream_eof = False  # the peer half-closed the stream
        self._tcp_eof = False  # the TCP peer half-closed
        self._done = False
        self.on_done = None  # called once when the bridge is finished

    # --- wiring ---------------------------------------------------------------------------

    def attach_stream(self, stream: LinkStream) -> None:
        self.stream = stream
        if self.transport is not None and stream.paused:
            self.transport.pause_reading()

    def fail(self, code: int) -> None:
        """Give up before or during the bridge: reset the stream and the TCP connection."""
        if self.stream is not None and not self._done:
            self.stream.reset(code)
        self._reset_tcp()
        self._finish()

    # --- TCP side (asyncio.Protocol) ------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        set_nodelay(transport)
        pending, self._pending = self._pending, []
        for chunk in pending:
            self._write_tcp(chunk)
        if self._stream_eof:
            self._write_tcp_eof()
        if self.stream is not None and self.stream.paused:
            transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        stream = self.stream
        if stream is None or self._done:
            return
        stream.write(data)
        if stream.paused:
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self._tcp_eof = True
        if self.stream is not None and not self._done:
            self.stream.write_eof()
        self._maybe_close()
        return True  # keep the transport open: the other direction may still flow

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done:
            if self.stream is not None:
                # An error, or a close before both directions ended: the stream cannot end
                # cleanly any more.
                if exc is not None or not (self._tcp_eof and self._stream_eof):
                    self.stream.reset(ErrorCode.CONNECTION_RESET if exc is not None else ErrorCode.NO_ERROR)
            self._finish()

    def pause_writing(self) -> None:
        self._tcp_write_paused = True

    def resume_writing(self) -> None:
        self._tcp_write_paused = False
        if self._unconsumed and self.stream is not None and not self._done:
            n, self._unconsumed = self._unconsumed, 0
            self.stream.consume(n)

    # --- stream side (StreamHandler) ------------------------------------------------------

    def _write_tcp(self, data) -> None:
        self.transport.write(data)
        if self._tcp_write_paused:
            self._unconsumed += len(data)
        else:
            self.stream.consume(len(data))

    def stream_data(self, data) -> None:
        if self.transport is None:
            # Keep the view: it refers to an immutable buffer, and credit is not returned
            # until it is written, so the window bounds what waits here.
            self._pending.append(data)
        elif not self._done:
            self._write_tcp(data)

    def stream_eof(self) -> None:
        self._stream_eof = True
        if self.transport is not None:
            self._write_tcp_eof()

    def _write_tcp_eof(self) -> None:
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._maybe_close()

    def _maybe_close(self) -> None:
        if self._tcp_eof and self._stream_eof and self.transport is not None:
            self.transport.close()  # flushes what is buffered, then closes

    def _reset_tcp(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            except OSError:
                pass
        transport.abort()

    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        self._pending = []
        callback, self.on_done = self.on_done, None
        if callback is not None:
            callback()

    def stream_reset(self, code: int) -> None:
        self._reset_tcp()
        self._finish()

    def stream_writable(self) -> None:
        if self.transport is not None and not self._done:
            self.transport.resume_reading()

    def stream_closed(self) -> None:
        # Both stream directions are over; the TCP side closes once it flushed.
        if self.transport is not None and not self.transport.is_closing():
            self._maybe_close()


class _StreamSide(StreamHandler):
    """Routes StreamHandler calls to a TcpBridge (whose own method names belong to TCP)."""

    __slots__ = ("bridge",)

    def __init__(self, bridge: TcpBridge) -> None:
        self.bridge = bridge

    def data_received(self, data) -> None:
        self.bridge.stream_data(data)

    def eof_received(self) -> None:
        self.bridge.stream_eof()

    def reset_received(self, code: int) -> None:
        self.bridge.stream_reset(code)

    def writable(self) -> None:
        self.bridge.stream_writable()

    def closed(self) -> None:
        self.bridge.stream_closed()


def stream_handler(bridge: TcpBridge) -> StreamHandler:
    """The StreamHandler to give the link for ``bridge``."""
    return _StreamSide(bridge)


async def dial_bridge(stream: LinkStream, bridge: TcpBridge, host: str, port: int, timeout: float) -> None:
    """Agent side: dial ``host:port`` for ``stream``; reset it with CONNECT_FAILED on failure."""
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(loop.create_connection(lambda: bridge, host, port), timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        log.info("stream %d: connect to %s:%d failed: %s", stream.stream_id, host, port,
                 exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__)
        bridge.fail(ErrorCode.CONNECT_FAILED)
