"""The agent's side of the QUIC carrier: dial the relay over one connected UDP socket."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import ssl

from tunnel.carriers.quic.config import configuration, new_session
from tunnel.carriers.quic.link import QuicLink, QuicPipe
from tunnel.carriers.quic.udp import UdpSender, datagram_size, route_datagram_size, udp_socket
from tunnel.core.limits import Limits
from tunnel.core.session_state import Role
from tunnel.quic_engine import DEFAULT_ENGINE
from tunnel.wire.constants import QUIC_ALPN, ErrorCode
from tunnel.wire.errors import LinkError

__all__ = ["connect_quic"]


class _ClientProtocol(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.pipe: QuicPipe | None = None

    def datagram_received(self, data, addr) -> None:
        if self.pipe is not None:
            self.pipe.datagram_received(data, addr)

    def error_received(self, exc) -> None:
        if self.pipe is not None and getattr(exc, "errno", None) != errno.EMSGSIZE:
            self.pipe.unreachable(exc)

    def connection_lost(self, exc) -> None:
        if self.pipe is not None:
            self.pipe.connection_lost(exc)


def _system_cafile() -> str | None:
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile, "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and os.path.exists(candidate):
            return candidate
    return None  # aioquic falls back to certifi's bundle


async def connect_quic(host: str, port: int, *, ca_file: str | None, server_name: str | None, limits: Limits,
                       timeout: float, engine: str = DEFAULT_ENGINE) -> QuicLink:
    """Dial the relay over QUIC and exchange HELLOs; raise ``LinkError`` on any failure.

    The relay's certificate is always verified: against ``ca_file`` when given, else the
    system trust store. ``engine``: the QUIC engine (:mod:`tunnel.quic_engine`).
    """
    loop = asyncio.get_running_loop()
    config = configuration(limits, is_client=True, engine=engine)
    config.server_name = server_name or host
    config.load_verify_locations(cafile=ca_file or _system_cafile())
    protocol = _ClientProtocol()
    transport = None
    link: QuicLink | None = None
    try:
        async with asyncio.timeout(timeout):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            if not infos:
                raise LinkError(f"cannot resolve {host}")
            family, _, _, _, addr = infos[0]
            sock = udp_socket(family, connect=addr)
            transport, _ = await loop.create_datagram_endpoint(lambda: protocol, sock=sock)
            peer = sock.getpeername()
            session = new_session(config, limits, datagram_size=datagram_size(limits, route_datagram_size(sock)),
                                  engine=engine)
            sender = UdpSender(transport, sock, connected=True, gso=bool(limits.quic_gso),
                               on_error=protocol.error_received)
            pipe = protocol.pipe = QuicPipe(session, sender.send, peer, loop, on_terminated=transport.close)
            link = QuicLink(pipe, Role.AGENT, limits, loop)
            pipe.start(peer)
            ready = asyncio.ensure_future(link.wait_ready())
            closed = asyncio.ensure_future(link.wait_closed())
            try:
                await asyncio.wait([ready, closed], return_when=asyncio.FIRST_COMPLETED)
            finally:
                ready.cancel()
                closed.cancel()
            if not link.ready:
                raise LinkError(f"QUIC connection to {host}:{port} failed: {_explain(link.error)}")
            return link
    except TimeoutError:
        if link is not None:
            link.close(ErrorCode.TIMEOUT, "handshake timeout")
        elif transport is not None:
            transport.close()
        raise LinkError(f"QUIC connection to {host}:{port} timed out after {timeout} s") from None
    except LinkError:
        if link is not None:
            link.close(ErrorCode.INTERNAL_ERROR, "connect failed")
        elif transport is not None:
            transport.close()
        raise
    except OSError as exc:
        if transport is not None:
            transport.close()
        raise LinkError(f"QUIC connection to {host}:{port} failed: {exc}") from None


def _explain(error: str | None) -> str:
    if error and "ALPN" in error:  # e.g. a relay of 0.1.0 (tunnel/1)
        return f"{error} (the relay speaks another QUIC mapping than {QUIC_ALPN}: upgrade it, or use wss://)"
    return error or "closed"
