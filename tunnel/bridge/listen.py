"""The relay's agent-facing listeners: TLS WebSocket on TCP and QUIC on UDP, one port number.

The relay hands :func:`serve_links` its TLS material and an ``on_link(link)`` callback and
gets every authenticated-to-be agent connection as a :class:`tunnel.carriers.base.Link`,
whichever carrier it rides.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable

from tunnel.carriers import handshakes
from tunnel.carriers.base import Link
from tunnel.carriers.quic import QuicServer, serve_quic
from tunnel.carriers.wss import serve_wss
from tunnel.core.limits import Limits

__all__ = ["Listeners", "handshake_failures", "serve_links", "serve_tls_links"]


def handshake_failures() -> dict[tuple[str, str], int]:
    """Handshakes the listeners of this process gave up before authentication, per
    ``(transport, reason)`` (see :data:`tunnel.carriers.handshakes.FAILURES`)."""
    return dict(handshakes.FAILURES)


class Listeners:
    """The WSS server and the QUIC server of one relay."""

    def __init__(self, wss: asyncio.Server, quic: QuicServer) -> None:
        self.wss = wss
        self.quic = quic
        #: The port both listen on.
        self.port: int = wss.sockets[0].getsockname()[1]

    def close(self) -> None:
        """Stop accepting; QUIC connections are closed at once (they share the socket)."""
        self.wss.close()
        self.quic.close()


async def serve_links(host: str, port: int, *, ssl_context: ssl.SSLContext, cert_file: str, key_file: str,
                      limits: Limits, on_link: Callable[[Link], None]) -> Listeners:
    """Listen for agents on TCP and UDP ``host:port`` (port 0: one free port for both)."""
    wss = await serve_wss(host, port, ssl_context=ssl_context, limits=limits, on_link=on_link)
    port = wss.sockets[0].getsockname()[1]
    try:
        quic = await serve_quic(host, port, cert_file=cert_file, key_file=key_file, limits=limits, on_link=on_link)
    except BaseException:
        wss.close()
        raise
    return Listeners(wss, quic)


async def serve_tls_links(host: str, port: int, *, ssl_context: ssl.SSLContext, limits: Limits,
                          on_link: Callable[[Link], None]) -> asyncio.Server:
    """Listen on TCP ``host:port`` only (TLS WebSocket; port 0: a free one), for links between
    relays: ``ssl_context`` may require client certificates (``Link.peer_certificate``)."""
    return await serve_wss(host, port, ssl_context=ssl_context, limits=limits, on_link=on_link)
