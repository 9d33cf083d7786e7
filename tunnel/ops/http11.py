"""HTTP/1.1 server connections for the relay's admin API and the ``/metrics``, ``/live`` and
``/ready`` endpoints of relay and agent: the parsing is h11's, this module adds the asyncio
streams around it and the bounds a server on a shared port needs.

- **Deadlines.** A request head must arrive whole within ``head_timeout`` of the connection
  (or of the previous response, ``idle_timeout`` on keep-alive): bytes that trickle in do not
  renew it. A body must arrive, and a response be taken by the client, within ``body_timeout``.
- **Sizes.** A request head is at most ``max_head_size`` bytes (431 beyond, however many
  headers it is split into), a body at most what the application asks for (413).
- **Framing.** h11 parses; on top, a request with both ``Content-Length`` and
  ``Transfer-Encoding`` is refused (400), as is any HTTP version but 1.0 and 1.1 (505), a
  target that is not a path (400); every error closes the connection. Pipelined requests are
  answered one by one, in order.
- **Connections.** At most ``max_connections`` at once and ``max_per_client`` from one
  address. When a newcomer finds no place, the oldest connection that is still waiting for
  its request head (idle or half-sent: what slowloris holds) is closed to make room; only
  when every connection is busy answering is the newcomer refused. So a new ``/live`` or
  ``/ready`` probe is served however many idle or half-sent connections there are.

The application is one coroutine, ``handler(request) -> Response``; it reads the body (if
it wants it) with ``await request.read_body(limit)``, which raises :class:`RequestRejected`.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from http import HTTPStatus
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import h11

__all__ = ["HttpLimits", "HttpServer", "Request", "RequestRejected", "Response"]

log = logging.getLogger("tunnel.ops.http11")

_READ_SIZE = 64 * 1024
_REASONS = {status.value: status.phrase.encode("ascii") for status in HTTPStatus}


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """The bounds of one :class:`HttpServer`; see the module docstring."""

    head_timeout: float = 10.0
    idle_timeout: float = 30.0
    body_timeout: float = 10.0
    max_head_size: int = 16 * 1024
    max_connections: int = 64
    max_per_client: int = 64


class RequestRejected(Exception):
    """The request cannot be served: answered with ``status`` and the connection closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(slots=True)
class Response:
    """What a handler answers. ``close`` ends the connection after it."""

    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    close: bool = False


class Request:
    """One parsed request: ``method`` and ``version`` (``"1.1"``) as text, ``target`` the raw
    path and query, ``headers`` lower-case names to values (repeats joined with ``", "``)."""

    __slots__ = ("method", "target", "version", "headers", "_conn")

    def __init__(self, event: h11.Request, conn: "_Connection") -> None:
        self.method = event.method.decode("ascii")
        self.target = event.target.decode("ascii")
        self.version = event.http_version.decode("ascii")
        headers: dict[str, str] = {}
        for name, value in event.headers:
            key = name.decode("ascii")
            text = value.decode("latin-1")
            headers[key] = headers[key] + ", " + text if key in headers else text
        self.headers = headers
        self._conn = conn

    async def read_body(self, limit: int) -> bytes:
        """The whole body (``b""`` if none); :class:`RequestRejected` when it would exceed
        ``limit`` bytes (413, before reading any of it when ``Content-Length`` says so) or
        does not arrive within the body deadline (408)."""
        return await self._conn.read_body(limit)


Handler = Callable[[Request], Awaitable[Response]]
ErrorBody = Callable[[int, str], tuple[bytes, list[tuple[str, str]]]]


class HttpServer:
    """Serves ``handler`` on one listening socket; ``error_body(status, message)`` renders the
    answers to bad requests (body and extra headers, e.g. ``Content-Type``)."""

    def __init__(self, handler: Handler, limits: HttpLimits, error_body: ErrorBody) -> None:
        self.handler = handler
        self.limits = limits
        self.error_body = error_body
        self.server: asyncio.Server | None = None
        #: Open connections, oldest first (dicts keep insertion order).
        self.open: dict[_Connection, None] = {}

    @property
    def connections(self) -> int:
        return len(self.open)

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> asyncio.Server:
        """Listen on ``host:port`` (0: a free port); ``OSError`` if it cannot be bound."""
        self.server = await asyncio.start_server(
            self._serve, host, port, reuse_address=True, limit=self.limits.max_head_size, ssl=ssl_context,
            ssl_handshake_timeout=self.limits.head_timeout if ssl_context else None)
        return self.server

    def close(self) -> None:
        """Stop listening and close every open connection."""
        if self.server is not None:
            self.server.close()
        for conn in list(self.open):
            conn.abort()

    def _admit(self, conn: "_Connection") -> bool:
        same_client = [other for other in self.open if other.client == conn.client]
        if len(same_client) >= self.limits.max_per_client and not self._evict(same_client):
            return False
        if len(self.open) >= self.limits.max_connections and not self._evict(list(self.open)):
            return False
        self.open[conn] = None
        return True

    def _evict(self, candidates: list["_Connection"]) -> bool:
        for other in candidates:  # oldest first
            if other.waiting:
                other.abort()
                return True
        return False

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Connection(self, reader, writer)
        if not self._admit(conn):
            writer.transport.abort()
            return
        try:
            await conn.run()
        finally:
            self.open.pop(conn, None)


class _Connection:
    def __init__(self, server: HttpServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.limits = server.limits
        self.reader = reader
        self.writer = writer
        peer = writer.get_extra_info("peername")
        self.client = peer[0] if isinstance(peer, tuple) else peer
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_head_size)
        #: No request head received yet in this cycle: may be closed to make room.
        self.waiting = True
        self.content_length: int | None = None
        self.fed = 0

    def abort(self) -> None:
        self.server.open.pop(self, None)
        self.writer.transport.abort()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        timeout = self.limits.head_timeout
        try:
            while True:
                self.waiting = True
                self.fed = len(self.h11.trailing_data[0])
                try:
                    event = await self._next_event(loop.time() + timeout)
                except (TimeoutError, ConnectionError):
                    return
                except h11.RemoteProtocolError as exc:
                    await self._reject(exc.error_status_hint, _message(exc))
                    return
                if type(event) is not h11.Request:  # ConnectionClosed: the client is done
                    return
                if self.fed - len(self.h11.trailing_data[0]) > self.limits.max_head_size:
                    await self._reject(431, "request head too large")
                    return
                self.waiting = False
                if not await self._answer(event):
                    return
                self.h11.start_next_cycle()
                timeout = self.limits.idle_timeout
        except ConnectionError:
            pass
        except Exception:  # noqa: BLE001 - one connection's failure must not reach the listener
            log.exception("HTTP connection failed")
        finally:
            self.writer.close()

    async def _next_event(self, deadline: float):
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            # While a head is awaited, no more than max_head_size + 1 of its bytes are read:
            # h11's bound on an incomplete event then answers 431 before a larger head is parsed.
            size = max(1, self.limits.max_head_size + 1 - self.fed) if self.waiting else _READ_SIZE
            async with asyncio.timeout_at(deadline):
                data = await self.reader.read(size)
            self.fed += len(data)
            self.h11.receive_data(data)

    async def _answer(self, event: h11.Request) -> bool:
        """Answer one request; True when the connection may carry the next one."""
        names = {name for name, _ in event.headers}
        if event.http_version not in (b"1.0", b"1.1"):
            await self._reject(505, "only HTTP/1.1 is supported")
            return False
        if b"content-length" in names and b"transfer-encoding" in names:
            await self._reject(400, "both Content-Length and Transfer-Encoding")
            return False
        if not event.target.startswith(b"/"):
            await self._reject(400, "malformed request target")
            return False
        self.content_length = next((int(value) for name, value in event.headers if name == b"content-length"), None)
        request = Request(event, self)
        try:
            response = await self.server.handler(request)
        except RequestRejected as exc:
            await self._reject(exc.status, exc.message)
            return False
        if self.h11.their_state is h11.SEND_BODY:
            # The handler did not read the body: take an empty one, else close rather than
            # read a body nobody asked for as the next request.
            try:
                if type(self.h11.next_event()) is not h11.EndOfMessage:
                    response.close = True
            except h11.RemoteProtocolError:
                response.close = True
        await self._send(response, head_only=event.method == b"HEAD")
        return not response.close and self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE

    async def read_body(self, limit: int) -> bytes:
        if self.content_length is not None and self.content_length > limit:
            raise RequestRejected(413, f"body exceeds {limit} bytes")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.body_timeout
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                event = await self._next_event(deadline)
            except TimeoutError:
                raise RequestRejected(408, "body not received in time") from None
            except h11.RemoteProtocolError as exc:
                if self.reader.at_eof():  # the client went away mid-body: nobody to answer
                    raise ConnectionResetError("the client closed before the end of the body") from None
                raise RequestRejected(exc.error_status_hint, _message(exc)) from None
            if type(event) is h11.Data:
                size += len(event.data)
                if size > limit:
                    raise RequestRejected(413, f"body exceeds {limit} bytes")
                chunks.append(bytes(event.data))
            elif type(event) is h11.EndOfMessage:
                return b"".join(chunks)
            else:  # ConnectionClosed before the end of the body
                raise ConnectionResetError("the client closed before the end of the body")

    async def _reject(self, status: int, message: str) -> None:
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body, headers = self.server.error_body(status, message)
        await self._send(Response(status, body, headers, close=True), head_only=False)

    async def _send(self, response: Response, head_only: bool) -> None:
        headers = [("Content-Length", str(len(response.body))), *response.headers]
        if response.close:
            headers = [(name, value) for name, value in headers if name.lower() != "connection"]
            headers.append(("Connection", "close"))
        data = self.h11.send(h11.Response(status_code=response.status, headers=headers,
                                          reason=_REASONS.get(response.status, b"")))
        if not head_only and response.body:
            data += self.h11.send(h11.Data(data=response.body))
        data += self.h11.send(h11.EndOfMessage())
        self.writer.write(data)
        try:
            async with asyncio.timeout(self.limits.body_timeout):
                await self.writer.drain()
        except TimeoutError:  # a client that does not read its answer loses the connection
            self.writer.transport.abort()
            raise ConnectionResetError("the client did not read the response in time") from None


def _message(exc: h11.RemoteProtocolError) -> str:
    if exc.error_status_hint == 431:
        return "request head too large"
    return str(exc) or "bad request"
