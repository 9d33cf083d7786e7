"""Joins one TCP connection to one tunneled stream, both directions, with backpressure.

Used on both ends: the relay bridges each integration worker's connection to a new stream,
the agent bridges each stream it accepts to a connection it dials to the private service.

- TCP → stream: bytes read are queued on the stream; while the stream is ``paused`` the
  socket is not read (``StreamHandler.writable`` resumes it).
- stream → TCP: credit is returned with ``consume`` only for bytes the kernel took. What
  the link delivers at once (one piece, or the pieces of one received batch through
  ``data_received_many``) goes straight to the socket in one ``write``/``writev`` while
  nothing waits in the transport; what the kernel does not take at once is copied into the
  transport (never a view: a view would keep the carrier's whole read buffer alive) and
  stays unconsumed until the transport has drained (its write buffer limits are zero, so
  ``resume_writing`` means empty). A slow TCP peer stalls its own stream's window and
  nothing else, and every byte the bridge holds in user space counts against the link's
  windows.
- Per link, :class:`LinkBuffers` adds up what the bridges hold (pieces waiting for a dial,
  bytes in transports): a stream that would push it past its limit is reset
  (``FLOW_CONTROL_ERROR``), a second line behind the flow control that already bounds it.
- A FIN travels as a half-close either way; a TCP reset becomes a stream RESET
  (``CONNECTION_RESET``) and a stream RESET becomes a TCP reset (RST via SO_LINGER 0).
- For metrics, each bridge counts the bytes it moved each way (one addition per batch, read
  by the relay's collectors at scrape time) and keeps the code its stream was reset with.

The build compiles this module (``tcp.pxd`` gives the types), so :class:`TcpBridge` is an
extension type: it cannot derive from ``asyncio.Protocol`` and need not (asyncio and uvloop
only call its methods); Python classes may derive from it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct

from tunnel.carriers import tls
from tunnel.carriers.base import LinkStream, StreamHandler
from tunnel.carriers.pipe import set_nodelay
from tunnel.wire.constants import ErrorCode

log = logging.getLogger("tunnel.bridge.tcp")

_LINGER_RST = struct.pack("ii", 1, 0)
#: Most buffers one writev takes (the rest goes through the transport).
_IOV_MAX = os.sysconf("SC_IOV_MAX")


def _joined(pieces, skip: int) -> bytes:
    """The bytes of ``pieces`` after the first ``skip``, as one copy (a view would pin the
    whole buffer the carrier decrypted it into)."""
    parts = []
    for data in pieces:
        size = len(data)
        if skip >= size:
            skip -= size
            continue
        parts.append(data[skip:] if skip else data)
        skip = 0
    return b"".join(parts)


class LinkBuffers:
    """Bytes the bridges of one link hold in user space: pieces waiting for a dial and bytes
    a TCP transport has not handed to the kernel yet. They are all unconsumed, so the link's
    session window bounds them; ``limit`` (the session window) is checked here too."""

    __slots__ = ("limit", "held")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, n: int) -> bool:
        """Count ``n`` more bytes held; False (nothing counted) if that exceeds the limit."""
        held = self.held + n
        if held > self.limit:
            return False
        self.held = held
        return True

    def release(self, n: int) -> None:
        self.held -= n


class TcpBridge:
    """asyncio protocol of the TCP side; :func:`stream_handler` gives its stream side.

    The stream may be attached after the TCP connection (relay: connection first) or the TCP
    connection after the stream (agent: stream first, then the dial); whatever arrives on the
    stream before the dial completes waits here as a copy, counted against the stream's
    window and ``buffers``.
    """

    __slots__ = ("stream", "transport", "buffers", "_fd", "_pending", "_unconsumed", "_tcp_write_paused",
                 "_stream_eof", "_tcp_eof", "_done", "on_done", "bytes_from_tcp", "bytes_to_tcp", "reset_code")

    def __init__(self, stream: LinkStream | None = None, buffers: LinkBuffers | None = None) -> None:
        self.stream = stream
        self.transport: asyncio.Transport | None = None
        #: The link's account of held bytes (None: only the stream's window bounds them).
        self.buffers = buffers
        self._fd = -1  # the TCP socket, written directly while the transport holds nothing
        self._pending: list = []  # copies of stream bytes received before the TCP side exists
        self._unconsumed = 0  # bytes received from the stream that the kernel has not taken
        self._tcp_write_paused = False
        self._stream_eof = False  # the peer half-closed the stream
        self._tcp_eof = False  # the TCP peer half-closed
        self._done = False
        self.on_done = None  # called once when the bridge is finished
        #: Bytes read from the TCP connection (sent on the stream), and received from the
        #: stream for the TCP connection.
        self.bytes_from_tcp = 0
        self.bytes_to_tcp = 0
        #: The code the stream was reset with (by either side, or for a TCP error); None
        #: while it has not been reset.
        self.reset_code: int | None = None

    @property
    def done(self) -> bool:
        """The bridge is finished (both ends closed, or reset)."""
        return self._done

    # --- wiring ---------------------------------------------------------------------------

    def attach_stream(self, stream: LinkStream) -> None:
        self.stream = stream
        if self.transport is not None and stream.paused:
            self.transport.pause_reading()

    def fail(self, code: int) -> None:
        """Give up before or during the bridge: reset the stream and the TCP connection."""
        if not self._done and self.reset_code is None:
            self.reset_code = code
        if self.stream is not None and not self._done:
            self.stream.reset(code)
        self._reset_tcp()
        self._finish()

    # --- TCP side (asyncio.Protocol) ------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        set_nodelay(transport)
        # pause_writing as soon as anything waits in the transport, resume_writing once it is
        # empty: then "not paused" means every byte written so far is in the kernel.
        transport.set_write_buffer_limits(high=0, low=0)
        sock = transport.get_extra_info("socket")
        self._fd = sock.fileno() if sock is not None else -1
        pending, self._pending = self._pending, []
        if pending:
            self._unhold(sum(map(len, pending)))
            self._write_tcp(pending)
        if self._stream_eof:
            self._write_tcp_eof()
        if self.stream is not None and self.stream.paused:
            transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        stream = self.stream
        if stream is None or self._done:
            return
        self.bytes_from_tcp += len(data)
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
                    code = ErrorCode.CONNECTION_RESET if exc is not None else ErrorCode.NO_ERROR
                    self.reset_code = code
                    self.stream.reset(code)
            self._finish()

    def pause_writing(self) -> None:
        self._tcp_write_paused = True

    def resume_writing(self) -> None:
        # The transport's buffer is empty (low-water mark 0): the kernel took everything.
        self._tcp_write_paused = False
        if self._unconsumed and not self._done:
            n, self._unconsumed = self._unconsumed, 0
            self._unhold(n)
            self.stream.consume(n)

    # --- stream side (StreamHandler) ------------------------------------------------------

    def _hold(self, n: int) -> bool:
        """Count ``n`` bytes held in user space; False after resetting the stream when that
        would exceed the link's limit."""
        buffers = self.buffers
        if buffers is not None and not buffers.take(n):
            log.warning("stream %d: %d bytes held for TCP sockets on this link would exceed %d; resetting it",
                        self.stream.stream_id, buffers.held + n, buffers.limit)
            self.fail(ErrorCode.FLOW_CONTROL_ERROR)
            return False
        return True

    def _unhold(self, n: int) -> None:
        if self.buffers is not None:
            self.buffers.release(n)

    def _write_tcp(self, pieces) -> None:
        """Write the buffers ``pieces`` (a list or tuple), in order, to the TCP connection."""
        n = 0
        for data in pieces:
            n += len(data)
        transport = self.transport
        if transport.is_closing():
            self.stream.consume(n)  # nobody will take these: the connection is ending
            return
        sent = 0
        if not self._tcp_write_paused and self._fd >= 0 and not transport.get_write_buffer_size():
            # Nothing waits in the transport: what the kernel takes now is consumed, zero copy.
            try:
                if len(pieces) == 1:
                    sent = os.write(self._fd, pieces[0])
                else:
                    sent = os.writev(self._fd, pieces if len(pieces) <= _IOV_MAX else pieces[:_IOV_MAX])
            except BlockingIOError:
                pass
            except OSError:
                self.fail(ErrorCode.CONNECTION_RESET)
                return
            if sent:
                self.stream.consume(sent)
                if sent == n:
                    return
        rest = n - sent
        transport.write(_joined(pieces, sent))
        if not self._tcp_write_paused:
            self.stream.consume(rest)  # the transport sent it at once
        elif self._hold(rest):
            self._unconsumed += rest

    def stream_data(self, data) -> None:
        self.stream_data_many((data,))

    def stream_data_many(self, pieces) -> None:
        """Bytes from the stream, several pieces that arrived together."""
        if self._done:
            return
        n = 0
        for data in pieces:
            n += len(data)
        self.bytes_to_tcp += n
        if self.transport is None:
            # Dial in progress: keep a copy (a view would pin the carrier's read buffer);
            # credit waits until it is written.
            if self._hold(n):
                self._pending.append(_joined(pieces, 0))
        else:
            self._write_tcp(pieces)

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
        if tls.on_engine(transport):
            # aiofastnet starts reading once connection_made has returned, even on a transport
            # aborted inside it (a relay refusing a worker), and then watches that descriptor
            # number, which the next accepted connection gets: abort after this callback.
            asyncio.get_running_loop().call_soon(transport.abort)
        else:
            transport.abort()

    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        self._unhold(sum(map(len, self._pending)) + self._unconsumed)
        self._pending = []
        self._unconsumed = 0  # the stream is reset or ended: the link frees its credit
        callback, self.on_done = self.on_done, None
        if callback is not None:
            callback()

    def stream_reset(self, code: int) -> None:
        if not self._done:
            self.reset_code = code
        self._reset_tcp()
        self._finish()

    def stream_writable(self) -> None:
        if self.transport is not None and not self._done:
            self.transport.resume_reading()

    def stream_closed(self) -> None:
        # Both stream directions are over; the TCP side closes once it flushed.
        if self.transport is not None and not self.transport.is_closing():
            self._maybe_close()


class _StreamSide:
    """Routes :class:`~tunnel.carriers.base.StreamHandler` calls to a TcpBridge (whose own
    method names belong to TCP). Compiled, so not derived from StreamHandler: it has all of
    its methods."""

    __slots__ = ("bridge",)

    def __init__(self, bridge: TcpBridge) -> None:
        self.bridge = bridge

    def data_received(self, data) -> None:
        self.bridge.stream_data(data)

    def data_received_many(self, pieces: list) -> None:
        self.bridge.stream_data_many(pieces)

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


async def dial_bridge(stream: LinkStream, bridge: TcpBridge, host: str, port: int, timeout: float,
                      on_result=None) -> OSError | asyncio.TimeoutError | None:
    """Agent side: dial ``host:port`` for ``stream``; reset it with CONNECT_FAILED on failure.
    Returns why the dial failed (None once connected).

    ``on_result(exc)`` (optional) hears the same outcome before the stream is reset (a report
    it sends to the relay goes out ahead of the RESET); the caller then logs the failure."""
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(tls.open_tcp(loop, lambda: bridge, host, port), timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        log.log(logging.DEBUG if on_result is not None else logging.INFO, "stream %d: connect to %s:%d failed: %s",
                stream.stream_id, host, port,
                exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__)
        if on_result is not None:
            on_result(exc)  # first: a report it sends to the relay goes out ahead of the RESET
        bridge.fail(ErrorCode.CONNECT_FAILED)
        return exc
    if on_result is not None:
        on_result(None)
    return None


async def serve_bridges(factory, host: str, port: int, **kwargs):
    """Relay side: a TCP listener on ``host:port`` whose connections go to the bridges ``factory``
    makes, on the transports of the selected TLS engine (:func:`tunnel.carriers.tls.serve_tcp`,
    whose ``kwargs`` it takes); its ``stop()`` serves the connections already queued."""
    return await tls.serve_tcp(asyncio.get_running_loop(), factory, host, port, **kwargs)
