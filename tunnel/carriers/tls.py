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

TLS 1.3 suites: OpenSSL offers and, as a server, prefers TLS_AES_256_GCM_SHA384 first; Python's
``ssl`` cannot reorder TLS 1.3 suites. :func:`prefer_aes128` puts TLS_AES_128_GCM_SHA256 first for
every context the process creates from then on, through OpenSSL's own configuration (the relay
calls it at start: as the server it chooses the suite of every link; peers keep all three).

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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .listener import TcpListener

__all__ = ["ENGINES", "engine", "describe", "select", "create_connection", "create_server", "start_tls",
           "prefer_aes128", "on_engine", "open_tcp", "serve_tcp"]

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


#: The TLS 1.3 suites in the order :func:`prefer_aes128` sets: AES-128-GCM first (the cipher ssh
#: uses here; 4-13 % less CPU per GB on each end than AES-256-GCM in bench/README.md's runs, 1-7 %
#: in bench/results/i21-bulk/03-*), then OpenSSL's own two.
TLS13_SUITES = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"


def prefer_aes128() -> bool:
    """Make :data:`TLS13_SUITES` the TLS 1.3 suites of the SSL contexts this process creates from
    now on; True if done.

    OpenSSL applies its configuration's ``system_default`` section to every new context. This
    loads the process's configuration file again (``OPENSSL_CONF``, else the system's), adds
    ``Ciphersuites`` to that section (every other setting stays) and has OpenSSL apply its
    ``ssl_conf`` module, through OpenSSL's public configuration API (``NCONF_load_bio``,
    ``CONF_modules_load``) on the libcrypto the ``ssl`` module uses. Nothing is changed (False)
    when that section sets ``Ciphersuites`` itself (the operator's choice stands, e.g.
    deploy/openssl/tls13-aes128.cnf), or where that libcrypto cannot be found (no aiofastnet, a
    statically linked Python).
    """
    if _engine is None and not _load_aiofastnet():
        return False
    import aiofastnet

    libs = aiofastnet.OPENSSL_DYN_LIBS
    if libs is None:
        return False
    import ctypes

    crypto = ctypes.CDLL(libs.libcrypto)
    ptr, text = ctypes.c_void_p, ctypes.c_char_p
    for name, restype, argtypes in (
            ("CONF_get1_default_config_file", ptr, []), ("CRYPTO_free", None, [ptr, text, ctypes.c_int]),
            ("NCONF_new", ptr, [ptr]), ("NCONF_free", None, [ptr]),
            ("NCONF_load_bio", ctypes.c_int, [ptr, ptr, ctypes.POINTER(ctypes.c_long)]),
            ("NCONF_get_string", text, [ptr, text, text]), ("BIO_new_mem_buf", ptr, [text, ctypes.c_int]),
            ("BIO_free", ctypes.c_int, [ptr]), ("CONF_modules_load", ctypes.c_int, [ptr, text, ctypes.c_ulong]),
            ("ERR_clear_error", None, [])):
        getattr(crypto, name).restype = restype
        getattr(crypto, name).argtypes = argtypes

    def load(source: bytes):
        conf = crypto.NCONF_new(None)
        bio = crypto.BIO_new_mem_buf(source, len(source))
        ok = crypto.NCONF_load_bio(conf, bio, ctypes.byref(ctypes.c_long()))
        crypto.BIO_free(bio)
        if ok != 1:
            crypto.NCONF_free(conf)
            return None
        return conf

    def get(conf, section: bytes | None, name: bytes) -> bytes | None:
        return crypto.NCONF_get_string(conf, section, name) if section else None

    raw = crypto.CONF_get1_default_config_file()
    path = ctypes.cast(raw, text).value if raw else None
    crypto.CRYPTO_free(raw, b"", 0)
    include = b".include " + path + b"\n" if path and os.path.isfile(os.fsdecode(path)) else b""
    try:
        system = load(include or b"\n")
        if system is None:
            return False
        try:
            ssl_section = get(system, get(system, None, b"openssl_conf") or get(system, b"default", b"openssl_conf"),
                              b"ssl_conf")
            default = get(system, ssl_section, b"system_default")
            if get(system, default, b"Ciphersuites"):
                return False
        finally:
            crypto.NCONF_free(system)
        ours = b"tunnel_conf = tunnel_init\n" + include + b"[tunnel_init]\n"
        if default:
            ours += b"ssl_conf = " + ssl_section + b"\n[" + default + b"]\n"
        else:
            ours += b"ssl_conf = tunnel_ssl\n[tunnel_ssl]\nsystem_default = tunnel_tls\n[tunnel_tls]\n"
        ours += b"Ciphersuites = " + TLS13_SUITES.encode() + b"\n"
        conf = load(ours)
        if conf is None:
            return False
        try:
            return crypto.CONF_modules_load(conf, b"tunnel_conf", 0) == 1
        finally:
            crypto.NCONF_free(conf)
    finally:
        crypto.ERR_clear_error()  # NCONF_get_string queues an error for each name it misses


def _load_aiofastnet() -> bool:
    try:
        import aiofastnet  # noqa: F401
    except ImportError:  # pragma: no cover - a build without the dependency
        return False
    return True


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
                    host: str | None, port: int, *, backlog: int = 100, reuse_address: bool = True) -> TcpListener:
    """A plain TCP listener on ``host:port`` whose connections ride the selected engine's
    transports (the loop's for ``ssl``), and which can stop without resetting the connections
    the kernel has already accepted (:class:`tunnel.carriers.listener.TcpListener`)."""
    from .listener import TcpListener  # the relay's alone: the agent does not load it

    engine = _engine
    if engine is None:
        adopt = loop.connect_accepted_socket
    else:
        def adopt(factory, sock):
            return engine.connect_accepted_socket(loop, factory, sock)
    return TcpListener.open(loop, factory, adopt, host, port, backlog=backlog, reuse_address=reuse_address)
