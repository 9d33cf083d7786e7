"""The operations endpoints of relay and agent: ``/metrics`` (Prometheus text format),
``/live`` and ``/ready``, over plain HTTP/1.1 on the process's own event loop.

- ``GET /metrics``: ``render()``, the text exposition (:mod:`tunnel.ops.exposition`).
- ``GET /live``: 200 while the event loop answers (this server runs on it).
- ``GET /ready``: 200 ``ready`` when ``ready()`` returns None, else 503 with its answer (a
  short reason that names no secret, e.g. ``not registered with the relay``).

One request per connection (``Connection: close``), ``GET`` or ``HEAD`` only. Each
connection must send its request head (at most ``max_http_header_size``) and be answered
within ``handshake_timeout``; at most ``max_metrics_connections`` are served at once and
further ones are closed at once, so the port cannot be used to exhaust the process's
descriptors. Collectors run on the event loop, between its other callbacks: they read the
live state without locks.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable

from tunnel.core.limits import Limits
from tunnel.ops.exposition import CONTENT_TYPE

__all__ = ["MAX_CONNECTIONS", "OpsServer", "parse_listen", "serve_ops"]

#: Connections served at once by default (the relay's and the agent's settings,
#: ``max_metrics_connections``); more are closed.
MAX_CONNECTIONS = 16

log = logging.getLogger("tunnel.ops.metrics_http")

ReadyCheck = Callable[[], "str | None | Awaitable[str | None]"]


def parse_listen(value: str, what: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``:port`` (every interface) as ``(host, port)``;
    ``ValueError`` naming ``what`` otherwise."""
    text = value.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{what} must be host:port (e.g. 127.0.0.1:9464 or :9464), got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{what}: write an IPv6 address in brackets, e.g. [::1]:9464, got {value!r}")
    return host or "0.0.0.0", int(port_text)


class OpsServer:
    """Serves ``/metrics``, ``/live`` and ``/ready``; see the module docstring."""

    def __init__(self, render: Callable[[], bytes], ready: ReadyCheck, limits: Limits,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self.render = render
        self.ready = ready
        self.limits = limits
        self.max_connections = max_connections
        self.server: asyncio.AbstractServer | None = None
        self.connections = 0

    @property
    def port(self) -> int:
        return self.server.sockets[0].getsockname()[1]

    async def start(self, host: str, port: int) -> "OpsServer":
        self.server = await asyncio.start_server(self._serve, host, port, reuse_address=True,
                                                 limit=self.limits.max_http_header_size)
        return self

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections >= self.max_connections:
            writer.transport.abort()
            return
        self.connections += 1
        try:
            await asyncio.wait_for(self._answer(reader, writer), self.limits.handshake_timeout)
        except (asyncio.TimeoutError, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except Exception:  # noqa: BLE001 - a bug in a collector must not take the process down
            log.exception("metrics endpoint failed")
        finally:
            self.connections -= 1
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.LimitOverrunError, ValueError):
            await _respond(writer, 431, b"request head too large\n")
            return
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            await _respond(writer, 400, b"bad request\n")
            return
        method, target, _version = parts
        if method not in ("GET", "HEAD"):
            await _respond(writer, 405, b"only GET and HEAD\n", head_only=False, extra=b"Allow: GET, HEAD\r\n")
            return
        path = target.split("?", 1)[0]
        head_only = method == "HEAD"
        if path == "/metrics":
            await _respond(writer, 200, self.render(), head_only, content_type=CONTENT_TYPE.encode())
        elif path == "/live":
            await _respond(writer, 200, b"live\n", head_only)
        elif path == "/ready":
            answer = self.ready()
            if inspect.isawaitable(answer):
                answer = await answer
            if answer is None:
                await _respond(writer, 200, b"ready\n", head_only)
            else:
                await _respond(writer, 503, f"not ready: {answer}\n".encode(), head_only)
        else:
            await _respond(writer, 404, b"not found: try /metrics, /live or /ready\n", head_only)


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 503: "Service Unavailable"}


async def _respond(writer: asyncio.StreamWriter, status: int, body: bytes, head_only: bool = False,
                   content_type: bytes = b"text/plain; charset=utf-8", extra: bytes = b"") -> None:
    writer.write(b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%sConnection: close\r\n"
                 b"Cache-Control: no-store\r\n\r\n"
                 % (status, _REASONS[status].encode(), content_type, len(body), extra))
    if not head_only:
        writer.write(body)
    await writer.drain()


async def serve_ops(host: str, port: int, *, render: Callable[[], bytes], ready: ReadyCheck,
                    limits: Limits, max_connections: int = MAX_CONNECTIONS) -> OpsServer:
    """Listen on ``host:port`` (port 0: a free one, see ``.port``), serving at most
    ``max_connections`` at once; raises ``OSError`` if the address cannot be bound."""
    return await OpsServer(render, ready, limits, max_connections).start(host, port)
