"""The TLS WebSocket carrier: an asyncio (uvloop or stock) adapter around :mod:`tunnel.carriers.websocket`.

:class:`WebSocketPipe` is a :class:`tunnel.carriers.pipe.Pipe`: the binary payload of the WebSocket
connection, as one byte stream, goes to a :class:`tunnel.carriers.pipe.PipeReceiver`; each
``Pipe.write(buffers)`` leaves as one binary message (split above 1 MiB) through
``transport.writelines``; the transport's ``pause_writing``/``resume_writing`` reach the
receiver.

Agent side: :func:`open_wss_pipe` (or :func:`connect_wss` for a ready SessionLink) dials
``wss://host:port[/path]`` directly or through an HTTP CONNECT proxy (:mod:`tunnel.carriers.proxy`).

Relay side: :func:`serve_wss_pipes` (or :func:`serve_wss`). One deadline,
``limits.handshake_timeout``, starts at accept and covers the TLS handshake (done with
``start_tls`` after accept, so a TCP connection that never sends a ClientHello is cut too),
the upgrade and, after ``on_pipe``, authentication: the :class:`Slot` handed to ``on_pipe``
must be released in time or the connection is aborted. At most
``limits.max_pending_handshakes`` connections are in that phase at once; beyond that, a new
connection evicts the oldest handshake of the busiest source address if it is stale, else it is
closed at once (see :mod:`tunnel.carriers.handshakes`).

The build compiles this module (``wss.pxd`` gives the types). A compiled class cannot derive
from asyncio's protocol classes, so the pipe's code is in :class:`_WebSocketPipeBase` and
:class:`WebSocketPipe` adds the bases.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Callable, Sequence

from tunnel.carriers import tls as tls_engine
from tunnel.carriers.handshakes import PendingHandshakes, handshake_failed
from tunnel.carriers.pipe import Pipe, PipeReceiver, set_nodelay, set_notsent_lowat
from tunnel.carriers.websocket import (
    ClientHandshake,
    CloseCode,
    ServerHandshake,
    State,
    WebSocketConnection,
    buffer_in_use,
)
from tunnel.core.limits import Limits
from tunnel.wire.constants import WS_PATH
from tunnel.wire.errors import HandshakeError, LinkError

__all__ = [
    "WebSocketPipe",
    "Slot",
    "open_wss_pipe",
    "serve_wss_pipes",
    "connect_wss",
    "serve_wss",
    "parse_ws_url",
]

log = logging.getLogger("tunnel.carriers.wss")

#: How long a closing handshake may wait for the peer's close frame (seconds).
CLOSE_TIMEOUT = 5.0
#: Transport write buffer marks: the receiver is paused above HIGH and resumed below LOW.
WRITE_HIGH_WATER = 1024 * 1024
WRITE_LOW_WATER = 256 * 1024
#: A message up to this size goes to the TLS transport as one buffer: one TLS record (and
#: one SSL_read on the other end) instead of one per piece (header, frame headers, payloads).
JOIN_BELOW = 16 * 1024
#: Largest WebSocket message we send, each handed to the TLS transport on its own. 64 KiB
#: messages cost more per-message work than they saved in page faults (one stream, both
#: directions, 10-25 % less throughput than 1 MiB); the faults are handled by
#: :func:`tune_malloc` instead.
WRITE_CHUNK = 1024 * 1024
#: glibc malloc thresholds for :func:`tune_malloc`: the masked copy (agent) and the ciphertext
#: uvloop reads out of its BIO, up to WRITE_CHUNK each, then come from a heap that keeps up to
#: MALLOC_TRIM_THRESHOLD bytes free for reuse instead of fresh pages per message.
MALLOC_MMAP_THRESHOLD = 2 * WRITE_CHUNK
MALLOC_TRIM_THRESHOLD = 8 * WRITE_CHUNK
#: Size of a read buffer TLS records are decrypted into (see ``WebSocketPipe.get_buffer``):
#: a small one while less is pending (an idle link's pings and small messages), else a big one.
READ_BUFFER_SIZE = 256 * 1024
SMALL_READ_BUFFER_SIZE = 16 * 1024
#: Read buffers kept for reuse per thread; beyond them, a pinned pool gets throwaway ones.
READ_BUFFER_POOL = 4

_local = threading.local()  # .pool: the read buffers this thread's pipes share


def _read_buffer(size: int) -> bytearray:
    """A read buffer no view refers to any more.

    Payload pieces are handed on as views of it (zero copy); a piece someone keeps (a
    transport that could not send it at once, data held until a dial completes) pins its
    buffer, which is then not written again until that view is gone. Reads go to the first
    free buffer of a small per-thread pool, so bulk transfers reuse warm memory.
    """
    pool = getattr(_local, "pool", None)
    if pool is None:
        pool = _local.pool = []
    free = -1
    for i, buf in enumerate(pool):
        if not buffer_in_use(buf):
            if len(buf) >= size:
                return buf
            free = i
    buf = bytearray(size)
    if len(pool) < READ_BUFFER_POOL:
        pool.append(buf)
    elif free >= 0:
        pool[free] = buf  # a bigger one replaces a free small one
    return buf


class Slot:
    """A pending-handshake slot on the relay: ``release()`` once authentication is done.

    Releasing cancels the handshake deadline and frees the slot for another connection. It is
    idempotent and also happens when the connection closes.
    """

    __slots__ = ("_pipe", "_listener", "released")

    def __init__(self, pipe: "WebSocketPipe", listener: "_Listener") -> None:
        self._pipe = pipe
        self._listener = listener
        self.released = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self._listener.forget(self._pipe)
        self._pipe._cancel_deadline()


class _WebSocketPipeBase:
    """The code of :class:`WebSocketPipe` (see the module docstring)."""

    __slots__ = (
        "client", "limits", "transport", "peer_address", "forwarded_for", "subprotocol", "_handshake", "_conn",
        "_receiver", "_early", "_write_paused", "_lost", "_lost_exc", "_lost_delivered", "_error", "_closing",
        "_close_timer", "_deadline", "_tls_task", "_pre_tls", "_raw_early", "_listener", "slot", "_rbuf", "_loop",
        "_ready",
    )

    def __init__(self, *, client: bool, limits: Limits, handshake, listener: "_Listener | None" = None) -> None:
        self.client = client
        self.limits = limits
        self.transport: asyncio.Transport | None = None
        self.peer_address: tuple = ()
        #: X-Forwarded-For of the upgrade request (relay side, logging only).
        self.forwarded_for: str | None = None
        #: The selected subprotocol once upgraded.
        self.subprotocol: str | None = None
        self._handshake = handshake
        self._conn: WebSocketConnection | None = None
        self._receiver: PipeReceiver | None = None
        self._early: bytearray | None = None  # payload received before set_receiver
        self._write_paused = False
        self._lost = False
        self._lost_exc: Exception | None = None
        self._lost_delivered = False
        self._error: Exception | None = None  # why we closed, reported in connection_lost
        self._closing = False
        self._close_timer: asyncio.TimerHandle | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._tls_task: asyncio.Task | None = None
        self._pre_tls: list | None = None
        self._raw_early: list | None = None
        self._listener = listener
        self.slot: Slot | None = None
        self._rbuf: bytearray | None = None
        self._loop = asyncio.get_running_loop()
        self._ready: asyncio.Future | None = self._loop.create_future() if client else None

    # -- Pipe --

    @property
    def upgraded(self) -> bool:
        return self._conn is not None

    @property
    def peer_certificate(self) -> dict | None:
        """The peer's verified TLS certificate (``getpeercert()``), None without one."""
        return self.transport.get_extra_info("peercert") if self.transport is not None else None

    def set_receiver(self, receiver: PipeReceiver) -> None:
        self._receiver = receiver
        early, self._early = self._early, None
        if early:
            receiver.pipe_data_received(early)
            if self.transport is not None and not self._lost and not self._closing:
                self.transport.resume_reading()
        if self._write_paused:
            receiver.pipe_pause_writing()
        if self._lost:
            self._deliver_lost()

    def write(self, buffers: Sequence) -> None:
        conn = self._conn
        if conn is None or self._lost or conn.close_sent:
            return
        transport = self.transport
        for out in conn.encode_messages(buffers):
            if len(out) <= 16:
                size = 0
                for b in out:
                    size += len(b)
                if size <= JOIN_BELOW:
                    transport.write(b"".join(out))
                    continue
            transport.writelines(out)

    def close(self) -> None:
        """Send a close frame after what is queued; close the transport once the peer answers
        (or after CLOSE_TIMEOUT)."""
        if self._lost or self._closing or self.transport is None:
            return
        conn = self._conn
        if conn is None or conn.state == State.CLOSED:
            self._closing = True
            self.transport.close()
            return
        frame = conn.encode_close(CloseCode.NORMAL)
        if frame:
            self.transport.write(frame)
        self._closing = True
        self._close_timer = self._loop.call_later(CLOSE_TIMEOUT, self._close_timed_out)

    def abort(self) -> None:
        if self._tls_task is not None:
            self._tls_task.cancel()
        if self.transport is not None and not self._lost:
            self._closing = True
            self.transport.abort()

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer_address = tuple(peer) if isinstance(peer, (tuple, list)) else (peer,)
        set_nodelay(transport)
        set_notsent_lowat(transport, self.limits.link_notsent_lowat)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        if self.client:
            transport.write(self._handshake.request())
            return
        listener = self._listener
        if not listener.admit(self):
            log.warning("refusing connection from %s: %d handshakes pending", self.peer_address,
                        len(listener.handshakes))
            handshake_failed("wss", "full")
            self._lost = True  # never counted, never reported
            transport.abort()
            return
        self.slot = Slot(self, listener)
        self._deadline = self._loop.call_later(listener.limits.handshake_timeout, self._deadline_expired)
        if listener.ssl_context is not None:
            self._start_tls_soon(transport)

    def _start_tls_soon(self, raw: asyncio.Transport) -> None:
        """Run ``loop.start_tls`` on the accepted TCP transport.

        Stock asyncio honours the ``pause_reading`` below, but uvloop starts reading right
        after ``connection_made`` returns, so the start of the ClientHello may reach
        ``data_received`` before ``start_tls`` takes the transport over. Those raw bytes are
        kept (reading paused) and handed to the TLS protocol right after start_tls has
        scheduled its ``connection_made`` and ``resume_reading`` (FIFO ``call_soon`` order),
        before any further read.
        """
        raw.pause_reading()
        self._raw_early = []
        self._tls_task = self._loop.create_task(self._start_tls(raw))
        self._loop.call_soon(self._loop.call_soon, self._inject_raw_early, raw)

    def _inject_raw_early(self, raw: asyncio.Transport) -> None:
        early, self._raw_early = self._raw_early, None
        if not early or self._lost or raw.is_closing():
            return
        tls_protocol = raw.get_protocol()
        if tls_protocol is self:  # pragma: no cover - start_tls did not take over
            self.abort()
            return
        data = memoryview(b"".join(early))
        if hasattr(tls_protocol, "get_buffer"):
            while data:
                buf = tls_protocol.get_buffer(len(data))
                n = min(len(buf), len(data))
                buf[:n] = data[:n]
                tls_protocol.buffer_updated(n)
                data = data[n:]
        else:
            tls_protocol.data_received(bytes(data))

    async def _start_tls(self, raw: asyncio.Transport) -> None:
        listener = self._listener
        try:
            tls = await tls_engine.start_tls(
                self._loop, raw, self, listener.ssl_context, server_side=True,
                ssl_handshake_timeout=listener.limits.handshake_timeout)
        except BaseException as exc:  # noqa: BLE001 - every failure ends this connection only
            self._tls_task = None
            raw.abort()
            if not self._lost:
                reason = "TLS handshake timed out" if isinstance(exc, (asyncio.CancelledError, TimeoutError)) \
                    else f"TLS handshake failed: {_tls_failure(exc)}"
                log.info("wss %s: %s", self.peer_address, reason)
                if not isinstance(exc, (asyncio.CancelledError, TimeoutError)):  # else the deadline counts it
                    handshake_failed("wss", "tls")
                self.connection_lost(LinkError(reason))
            return
        self._tls_task = None
        if self._lost or tls is None:
            if tls is not None:
                tls.abort()
            return
        self.transport = tls
        tls.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        early, self._pre_tls = self._pre_tls, None
        for data in early or ():
            if self._lost:
                break
            self.data_received(data)

    def get_buffer(self, sizehint: int) -> memoryview:
        small = 0 <= sizehint <= SMALL_READ_BUFFER_SIZE
        buf = self._rbuf = _read_buffer(SMALL_READ_BUFFER_SIZE if small else READ_BUFFER_SIZE)
        return memoryview(buf)

    def buffer_updated(self, nbytes: int) -> None:
        buf, self._rbuf = self._rbuf, None
        self.data_received(memoryview(buf)[:nbytes])

    def data_received(self, data) -> None:
        if self._lost:
            return
        if self._raw_early is not None:
            # Raw TLS bytes read before start_tls() took the transport over (uvloop).
            self._raw_early.append(bytes(data))
            self.transport.pause_reading()
            return
        if self._tls_task is not None:
            # The TLS layer may deliver the first bytes before start_tls() has returned the
            # transport to answer on: hold them until it has.
            if self._pre_tls is None:
                self._pre_tls = []
            self._pre_tls.append(bytes(data))
            return
        if self._conn is not None:
            self._feed(data)
        elif self.client:
            self._client_handshake(data)
        else:
            self._server_handshake(data)

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._receiver is not None:
            self._receiver.pipe_pause_writing()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._receiver is not None:
            self._receiver.pipe_resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._cancel_deadline()
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        if self.slot is not None:
            self.slot.release()
        conn = self._conn
        if self._error is not None:
            err = self._error
        elif conn is None:
            err = LinkError(f"connection lost during the WebSocket handshake: {exc or 'closed'}")
        elif conn.failure is not None:
            err = LinkError(f"WebSocket protocol error: {conn.failure}")
        elif conn.close_received:
            code = conn.close_code
            if code in (CloseCode.NORMAL, CloseCode.GOING_AWAY, CloseCode.NO_STATUS):
                err = None
            else:
                err = LinkError(f"peer closed the WebSocket with {code} {conn.close_reason}".rstrip())
        elif self._closing and exc is None:
            err = None  # we closed (close() or abort())
        elif exc is not None:
            err = LinkError(f"connection lost: {exc}")
            err.__cause__ = exc
        else:
            err = LinkError("connection closed without a WebSocket close frame")
        self._lost_exc = err
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(err or LinkError("connection closed during the handshake"))
        self._deliver_lost()

    # -- internals --

    def _deliver_lost(self) -> None:
        receiver = self._receiver
        if receiver is None or self._lost_delivered:
            return
        self._lost_delivered = True
        receiver.pipe_connection_lost(self._lost_exc)

    def _client_handshake(self, data: bytes) -> None:
        try:
            rest = self._handshake.receive_data(data)
        except HandshakeError as exc:
            self._error = exc
            if not self._ready.done():
                self._ready.set_exception(exc)
            self.transport.abort()
            return
        if rest is None:
            return
        self.subprotocol = self._handshake.subprotocol
        self._conn = WebSocketConnection(True, self.limits.max_ws_frame_size, WRITE_CHUNK)
        self._handshake = None
        if not self._ready.done():
            self._ready.set_result(None)
        if rest:
            self._feed(rest)

    def _server_handshake(self, data: bytes) -> None:
        hs: ServerHandshake = self._handshake
        if hs.done:
            return  # rejected; the transport is closing
        if not hs.receive_data(data):
            return
        self.forwarded_for = hs.forwarded_for
        self.transport.write(hs.response)
        if not hs.accepted:
            log.info("wss %s: upgrade refused with %d (%s)", self.peer_address, hs.status, hs.reason)
            handshake_failed("wss", "upgrade")
            self._error = HandshakeError(f"upgrade refused: {hs.reason}", hs.status)
            self._closing = True
            self.transport.close()
            return
        self.subprotocol = hs.subprotocol
        self._conn = WebSocketConnection(False, self.limits.max_ws_frame_size, WRITE_CHUNK)
        self._handshake = None
        leftover = hs.leftover
        try:
            self._listener.on_pipe(self, self.slot)
        except Exception:  # noqa: BLE001 - a bug in on_pipe must not take the server down
            log.exception("wss %s: on_pipe failed", self.peer_address)
            self.abort()
            return
        if leftover and not self._lost:
            self._feed(leftover)

    def _feed(self, data) -> None:
        conn = self._conn
        pieces = conn.receive_data(data)
        if pieces:
            receiver = self._receiver
            if receiver is not None and self._early is None:
                for piece in pieces:
                    if self._lost:
                        break
                    receiver.pipe_data_received(piece)
            else:
                if self._early is None:
                    self._early = bytearray()
                for piece in pieces:
                    self._early += piece
                self.transport.pause_reading()  # bounded until a receiver takes it
        if self._lost:
            return
        out = conn.data_to_send()
        if out:
            self.transport.writelines(out)
        if conn.state == State.CLOSED:
            if conn.failure is not None:
                log.info("wss %s: closing on protocol error: %s", self.peer_address, conn.failure)
            self._closing = True
            self.transport.close()

    def _deadline_expired(self) -> None:
        self._deadline = None
        if self._lost:
            return
        log.info("wss %s: handshake deadline of %.1fs passed", self.peer_address,
                 self.limits.handshake_timeout)
        handshake_failed("wss", "timeout")
        self._error = LinkError("handshake deadline passed")
        self._closing = True
        if self._tls_task is not None:
            self._tls_task.cancel()
        if self.transport is not None:
            self.transport.abort()

    def _evict(self) -> None:
        """Give up this handshake at once to make room (see :mod:`tunnel.carriers.handshakes`)."""
        if self.slot is not None:
            self.slot.release()
        if self._lost:
            return
        handshake_failed("wss", "evicted")
        self._error = LinkError("handshake evicted: too many handshakes in progress")
        self._closing = True
        if self._tls_task is not None:
            self._tls_task.cancel()
        if self.transport is not None:
            self.transport.abort()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _close_timed_out(self) -> None:
        self._close_timer = None
        if not self._lost:
            self.transport.abort()


class WebSocketPipe(_WebSocketPipeBase, Pipe, asyncio.BufferedProtocol):
    """One WebSocket connection as a byte pipe (see the module docstring).

    A buffered protocol: uvloop's TLS transport decrypts straight into :func:`_read_buffer`
    (``SSLObject.read(n, buffer)``) instead of into a fresh 256 KiB ``bytes`` per read, which
    glibc serves with mmap, mremap and munmap and the kernel with page faults: about a
    fifth of the agent's CPU per small message, and one copy fewer for bulk data.
    """

    transport_name = "wss"


class _Listener:
    """Accepts connections and keeps the handshakes in progress (:mod:`tunnel.carriers.handshakes`)."""

    __slots__ = ("limits", "ssl_context", "on_pipe", "handshakes")

    def __init__(self, limits: Limits, ssl_context: ssl.SSLContext | None, on_pipe) -> None:
        self.limits = limits
        self.ssl_context = ssl_context
        self.on_pipe = on_pipe
        self.handshakes = PendingHandshakes(limits.max_pending_handshakes)

    def admit(self, pipe: WebSocketPipe) -> bool:
        """Take a handshake slot for ``pipe``, evicting a stale one if all are taken."""
        now = pipe._loop.time()
        if not self.handshakes.make_room(now, WebSocketPipe._evict):
            return False
        self.handshakes.admit(pipe, pipe.peer_address[0] if pipe.peer_address else None, now)
        return True

    def forget(self, pipe: WebSocketPipe) -> None:
        self.handshakes.forget(pipe)

    def __call__(self) -> WebSocketPipe:
        hs = ServerHandshake(self.limits.max_http_header_size)
        return WebSocketPipe(client=False, limits=self.limits, handshake=hs, listener=self)


def parse_ws_url(url: str) -> tuple[str, str, int, str]:
    """``(scheme, host, port, path)`` of a ``wss://`` or ``ws://`` URL (path defaults to
    ``/v1/link``)."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("wss", "ws"):
        raise ValueError(f"not a wss:// or ws:// URL: {url!r}")
    if not parts.hostname:
        raise ValueError(f"URL without a host: {url!r}")
    port = parts.port or (443 if scheme == "wss" else 80)
    path = parts.path or WS_PATH
    if parts.query:
        path += "?" + parts.query
    return scheme, parts.hostname, port, path


def _tls_failure(exc: BaseException) -> str:
    """Why a server-side TLS handshake failed, in words (a client that gives up mid-handshake
    leaves an exception without a message)."""
    if isinstance(exc, (ConnectionError, EOFError)) or (isinstance(exc, ssl.SSLError) and "EOF" in str(exc)):
        return ("the client closed the connection during the handshake (an agent does so when it does not trust "
                "the relay's certificate: check its RELAY_CA_FILE)")
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc) or type(exc).__name__
    return str(exc) or type(exc).__name__


async def open_wss_pipe(url: str, *, ssl_context: ssl.SSLContext | None, limits: Limits,
                        proxy: str | None = None, timeout: float | None = None) -> WebSocketPipe:
    """Dial ``url`` (``wss://host:port[/path]``, or ``ws://`` without TLS) and upgrade.

    The TLS server name and certificate check use the URL's host; ``ssl_context`` None means
    the system's default trust. ``proxy`` is an ``http://[user:pass@]host:port`` CONNECT proxy
    (see :func:`tunnel.carriers.proxy.proxy_for`), None to dial directly. ``timeout`` bounds
    everything. Failures raise :class:`LinkError` (``HandshakeError`` for a refused upgrade).
    """
    from tunnel.carriers.proxy import open_connect_tunnel

    scheme, host, port, path = parse_ws_url(url)
    loop = asyncio.get_running_loop()
    tls = None
    if scheme == "wss":
        tls = ssl_context if ssl_context is not None else ssl.create_default_context()
    hs = ClientHandshake(host, port, secure=scheme == "wss", path=path,
                         max_header_size=limits.max_http_header_size)
    pipe: WebSocketPipe | None = None
    try:
        async with asyncio.timeout(timeout):
            def factory() -> WebSocketPipe:
                return WebSocketPipe(client=True, limits=limits, handshake=hs)

            if proxy:
                sock = await open_connect_tunnel(proxy, host, port, None)
                try:
                    _, pipe = await tls_engine.create_connection(
                        loop, factory, sock=sock, ssl=tls, server_hostname=host if tls else None)
                except BaseException:
                    sock.close()
                    raise
            else:
                _, pipe = await tls_engine.create_connection(
                    loop, factory, host, port, ssl=tls, server_hostname=host if tls else None)
            await pipe._ready
    except LinkError:
        if pipe is not None:
            pipe.abort()
        raise
    except (OSError, TimeoutError, ssl.SSLError, EOFError) as exc:
        if pipe is not None:
            pipe.abort()
        what = "timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
        raise LinkError(f"connecting to {scheme}://{host}:{port}: {what}") from exc
    except BaseException:
        if pipe is not None:
            pipe.abort()
        raise
    return pipe


async def serve_wss_pipes(host: str, port: int, *, ssl_context: ssl.SSLContext | None, limits: Limits,
                          on_pipe: Callable[[WebSocketPipe, Slot], None],
                          sock: socket.socket | None = None) -> asyncio.Server:
    """Listen for agents; call ``on_pipe(pipe, slot)`` for every accepted upgrade.

    ``ssl_context`` None serves plain ``ws://`` (tests, or behind a TLS-terminating proxy).
    ``on_pipe`` must call ``pipe.set_receiver`` and later ``slot.release()`` once the peer has
    authenticated, before ``limits.handshake_timeout`` from accept.
    """
    loop = asyncio.get_running_loop()
    listener = _Listener(limits, ssl_context, on_pipe)
    tls = ssl_context is not None
    if sock is not None:
        return await tls_engine.create_server(loop, listener, sock=sock, tls=tls)
    return await tls_engine.create_server(loop, listener, host, port, tls=tls, reuse_address=True, backlog=1024)


# --- the session on top -------------------------------------------------------------------

async def connect_wss(url: str, *, ssl_context: ssl.SSLContext | None, limits: Limits,
                      proxy: str | None = None, timeout: float | None = None):
    """Agent side: dial ``url`` and return a ready :class:`tunnel.carriers.session_link.SessionLink`."""
    from tunnel.carriers.session_link import SessionLink
    from tunnel.core.session_state import Role

    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    pipe = await open_wss_pipe(url, ssl_context=ssl_context, limits=limits, proxy=proxy, timeout=timeout)
    link = SessionLink(pipe, Role.AGENT, limits, carrier="wss")
    try:
        async with asyncio.timeout_at(deadline):
            await link.wait_ready()
    except BaseException as exc:
        link.close()
        pipe.abort()
        if isinstance(exc, TimeoutError):
            raise LinkError(f"link to {url} not ready in time") from exc
        raise
    return link


async def serve_wss(host: str, port: int, *, ssl_context: ssl.SSLContext | None, limits: Limits,
                    on_link: Callable, sock: socket.socket | None = None) -> asyncio.Server:
    """Relay side: every accepted agent becomes a SessionLink passed to ``on_link``; call
    ``link.handshake_done()`` once it has authenticated (that releases its handshake slot)."""
    from tunnel.carriers.session_link import SessionLink
    from tunnel.core.session_state import Role

    def on_pipe(pipe: WebSocketPipe, slot: Slot) -> None:
        link = SessionLink(pipe, Role.RELAY, limits, carrier="wss", on_handshake_done=slot.release)
        on_link(link)

    return await serve_wss_pipes(host, port, ssl_context=ssl_context, limits=limits, on_pipe=on_pipe, sock=sock)
