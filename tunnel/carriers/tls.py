"""The TLS engine under the WSS carrier: which code moves TLS records between the socket and
the WebSocket pipe.

``openssl`` (the default): aiofastnet's compiled transports, which call OpenSSL's ``SSL_read``
and ``SSL_write`` on the socket directly. uvloop's TLS transport (``ssl``, the other engine)
goes through Python's ``ssl.SSLObject`` with two memory BIOs per record: a Python call and two
copies per record, and on the receiving side about twice the CPU per byte (bench/README.md,
"TLS engine"). Both take the same :class:`ssl.SSLContext`, so certificate and host name
checks stay OpenSSL's, configured as before.

``TUNNEL_TLS_ENGINE=ssl`` selects the loop's own TLS transport (for comparison, or should the
compiled one misbehave somewhere); when aiofastnet cannot be imported the loop's is used too.
The bridge's plain TCP sockets (the agent's to private services, the relay's to workers) take the
engine's plain transports too (:func:`open_tcp`, :func:`serve_tcp`): they read into a fresh
``bytes`` object, where uvloop reads into its own buffer and copies each read out, one copy of
every bulk byte less on each end (bench/bulk_cpu.py). ``ws://`` links stay on the loop's.

Handshake failures reach the caller (the agent's dial, the relay's ``start_tls``), which reports
them in its own words. The engine, as asyncio's TLS protocol does, also hands them to the loop's
exception handler, and for a peer that closes mid-handshake with the exception class instead of an
instance, which the default handler logs as a broken traceback: :func:`_quiet_handshake_reports`
drops those reports of the engine's transports and passes every other one on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from collections.abc import Callable

__all__ = ["ENGINES", "engine", "describe", "select", "create_connection", "create_server", "start_tls",
           "on_engine", "open_tcp", "serve_tcp"]

log = logging.getLogger("tunnel.carriers.tls")

#: The engines ``TUNNEL_TLS_ENGINE`` may name.
ENGINES = ("openssl", "ssl")


def _load(name: str):
    """aiofastnet's module when ``name`` is ``openssl`` and it is importable, else None."""
    name = name.strip().lower() or "openssl"
    if name not in ENGINES:
        raise ValueError(f"TUNNEL_TLS_ENGINE must be one of {', '.join(ENGINES)}, got {name!r}")
    if name == "ssl":
        return None
    try:
        import aiofastnet
    except ImportError as exc:  # pragma: no cover - a build without the dependency
        log.warning("TLS engine 'openssl' unavailable (%s): using the event loop's TLS transport", exc)
        return None
    return aiofastnet


_engine = _load(os.environ.get("TUNNEL_TLS_ENGINE", ""))


def engine() -> str:
    """The engine in use: ``openssl`` or ``ssl``."""
    return "ssl" if _engine is None else "openssl"


def describe() -> str:
    """The engine in words, for ``tunnel-agent check``: ``openssl (aiofastnet 1.2.0, libssl.so.3)``, or
    ``ssl (the event loop's)``; the former says ``Python's ssl module`` when aiofastnet finds no shared
    libssl to call (a statically linked Python) and works through the ``ssl`` module instead."""
    if _engine is None:
        return "ssl (the event loop's)"
    libs = _engine.OPENSSL_DYN_LIBS
    via = os.path.basename(libs.libssl) if libs is not None else "Python's ssl module"
    return f"openssl (aiofastnet {_engine.__version__}, {via})"


def select(name: str) -> str:
    """Use engine ``name`` for connections made from now on (tests and benchmarks compare the
    two in one process); returns the engine in use. ``ValueError`` for an unknown name."""
    global _engine
    _engine = _load(name)
    return engine()


def on_engine(transport: object) -> bool:
    """True for a transport of the compiled engine (aiofastnet's), False for the loop's."""
    return type(transport).__module__.startswith("aiofastnet.")


def _quiet_handshake_reports(loop: asyncio.AbstractEventLoop) -> None:
    """Install (once per loop) an exception handler that drops the engine's "SSL handshake failed"
    reports and passes everything else to the handler that was there before (or the default)."""
    previous = loop.get_exception_handler()
    if getattr(previous, "_tunnel_tls_filter", False):
        return

    def handler(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        transport = context.get("transport")
        if context.get("message") == "SSL handshake failed" and on_engine(transport):
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    handler._tunnel_tls_filter = True
    loop.set_exception_handler(handler)


async def create_connection(loop: asyncio.AbstractEventLoop, factory: Callable[[], asyncio.BaseProtocol],
                            host: str | None = None, port: int | None = None, *,
                            ssl: ssl.SSLContext | None, server_hostname: str | None = None,
                            sock: socket.socket | None = None):
    """``loop.create_connection`` on the selected engine when ``ssl`` is given (a connected
    ``sock``, e.g. a proxy tunnel, or ``host``/``port``)."""
    if _engine is None or ssl is None:
        return await loop.create_connection(factory, host, port, ssl=ssl, server_hostname=server_hostname,
                                            sock=sock)
    _quiet_handshake_reports(loop)
    return await _engine.create_connection(loop, factory, host, port, ssl=ssl, server_hostname=server_hostname,
                                           sock=sock)


async def create_server(loop: asyncio.AbstractEventLoop, factory: Callable[[], asyncio.BaseProtocol],
                        host: str | None = None, port: int | None = None, *, tls: bool,
                        sock: socket.socket | None = None, **kwargs) -> asyncio.AbstractServer:
    """A plain TCP server whose connections :func:`start_tls` upgrades: the engine's transports
    when ``tls`` (so the upgrade stays on the engine), else the loop's."""
    if _engine is None or not tls:
        return await loop.create_server(factory, host, port, sock=sock, **kwargs)
    return await _engine.create_server(loop, factory, host, port, sock=sock, **kwargs)


async def start_tls(loop: asyncio.AbstractEventLoop, transport: asyncio.BaseTransport,
                    protocol: asyncio.BaseProtocol, context: ssl.SSLContext, **kwargs) -> asyncio.Transport:
    """``loop.start_tls`` on the engine of ``transport`` (one from :func:`create_server`): the
    engine the server was created with, even if :func:`select` changed it since."""
    if not on_engine(transport):
        return await loop.start_tls(transport, protocol, context, **kwargs)
    import aiofastnet

    _quiet_handshake_reports(loop)
    return await aiofastnet.start_tls(loop, transport, protocol, context, **kwargs)


async def open_tcp(loop: asyncio.AbstractEventLoop, factory: Callable[[], asyncio.BaseProtocol],
                   host: str, port: int) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
    """A plain TCP connection to ``host:port`` on the selected engine's transport (the loop's
    for ``ssl``)."""
    if _engine is None:
        return await loop.create_connection(factory, host, port)
    return await _engine.create_connection(loop, factory, host, port)


async def serve_tcp(loop: asyncio.AbstractEventLoop, factory: Callable[[], asyncio.BaseProtocol],
                    host: str | None, port: int, **kwargs) -> asyncio.AbstractServer:
    """A plain TCP server on ``host:port`` whose connections ride the selected engine's
    transports (the loop's for ``ssl``); ``kwargs`` as ``loop.create_server``'s."""
    if _engine is None:
        return await loop.create_server(factory, host, port, **kwargs)
    return await _engine.create_server(loop, factory, host, port, **kwargs)
