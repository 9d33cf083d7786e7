"""The operations endpoints of relay and agent: ``/metrics`` (Prometheus text format),
``/live`` and ``/ready``, over plain HTTP/1.1 on the process's own event loop.

- ``GET /metrics``: ``render()``, the text exposition (:mod:`tunnel.ops.exposition`).
- ``GET /live``: 200 while the event loop answers (this server runs on it).
- ``GET /ready``: 200 ``ready`` when ``ready()`` returns None, else 503 with its answer (a
  short reason that names no secret, e.g. ``not registered with the relay``).

One request per connection (``Connection: close``), ``GET`` or ``HEAD`` only, served by
:mod:`tunnel.ops.http11` (h11): each connection must send its request head (at most
``max_http_header_size``) within ``handshake_timeout``; at most ``max_metrics_connections``
are open at once, at most half of them from one address, and a newcomer that finds no place
closes the oldest connection still waiting for its request head, so idle or half-sent
connections (slowloris) can never keep a ``/live`` or ``/ready`` probe out. Collectors run
on the event loop, between its other callbacks: they read the live state without locks.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable

from tunnel.core.limits import Limits
from tunnel.ops.exposition import CONTENT_TYPE
from tunnel.ops.http11 import HttpLimits, HttpServer, Request, Response

__all__ = ["MAX_CONNECTIONS", "OpsServer", "parse_listen", "serve_ops"]

#: Connections served at once by default (the relay's and the agent's settings,
#: ``max_metrics_connections``); more are closed.
MAX_CONNECTIONS = 16

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
        self.http = HttpServer(self._handle, HttpLimits(
            head_timeout=limits.handshake_timeout, body_timeout=limits.handshake_timeout,
            max_head_size=limits.max_http_header_size, max_connections=max_connections,
            max_per_client=max(2, max_connections // 2)), _error_body)

    @property
    def server(self) -> asyncio.AbstractServer | None:
        return self.http.server

    @property
    def connections(self) -> int:
        return self.http.connections

    @property
    def port(self) -> int:
        return self.http.server.sockets[0].getsockname()[1]

    async def start(self, host: str, port: int) -> "OpsServer":
        await self.http.start(host, port)
        return self

    def close(self) -> None:
        self.http.close()

    async def _handle(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return _text(405, b"only GET and HEAD\n", [("Allow", "GET, HEAD")])
        path = request.target.split("?", 1)[0]
        if path == "/metrics":
            return _text(200, self.render(), content_type=CONTENT_TYPE)
        if path == "/live":
            return _text(200, b"live\n")
        if path == "/ready":
            answer = self.ready()
            if inspect.isawaitable(answer):
                answer = await answer
            if answer is None:
                return _text(200, b"ready\n")
            return _text(503, f"not ready: {answer}\n".encode())
        return _text(404, b"not found: try /metrics, /live or /ready\n")


def _text(status: int, body: bytes, extra: list[tuple[str, str]] = (),
          content_type: str = "text/plain; charset=utf-8") -> Response:
    return Response(status, body, [("Content-Type", content_type), ("Cache-Control", "no-store"), *extra],
                    close=True)


def _error_body(status: int, message: str) -> tuple[bytes, list[tuple[str, str]]]:
    return (message + "\n").encode(), [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store")]


async def serve_ops(host: str, port: int, *, render: Callable[[], bytes], ready: ReadyCheck,
                    limits: Limits, max_connections: int = MAX_CONNECTIONS) -> OpsServer:
    """Listen on ``host:port`` (port 0: a free one, see ``.port``), serving at most
    ``max_connections`` at once; raises ``OSError`` if the address cannot be bound."""
    return await OpsServer(render, ready, limits, max_connections).start(host, port)
