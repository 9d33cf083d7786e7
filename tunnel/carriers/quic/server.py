"""The relay's side of the QUIC carrier: one UDP socket accepting links.

Connections are demultiplexed by connection ID (short-header packets by slicing it, without
a header parse). Admission is bounded like the WSS listener's: a handshake deadline
(``handshake_timeout``, covering the QUIC handshake, the HELLO exchange and authentication), a
cap on handshakes in progress where a stale one is evicted for a newcomer
(:mod:`tunnel.carriers.handshakes`), and ``max_quic_connections``. Once half the handshake slots
are taken, new clients must prove their address with a Retry round trip first (RFC 9000
section 8.1), so a flood of Initial packets from spoofed addresses cannot hold slots at all.
Always on aioquic (:mod:`~tunnel.carriers.quic.config` says why).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable

from tunnel.carriers.base import Link
from tunnel.carriers.handshakes import PendingHandshakes, handshake_failed
from tunnel.carriers.quic.config import configuration, new_session
from tunnel.carriers.quic.link import QuicLink, QuicPipe
from tunnel.carriers.quic.udp import (
    SMALLEST_MAX_DATAGRAM_SIZE,
    UdpSender,
    datagram_size,
    peer_route_datagram_size,
    udp_socket,
)
from tunnel.core.limits import Limits
from tunnel.core.session_state import Role
from tunnel.quic_engine import DEFAULT_ENGINE, load_engine
from tunnel.wire.constants import ErrorCode

__all__ = ["QuicServer", "serve_quic"]

log = logging.getLogger("tunnel.carriers.quic")


class QuicServer(asyncio.DatagramProtocol):
    """One UDP socket accepting QUIC links; see :func:`serve_quic`."""

    def __init__(self, configuration, limits: Limits, on_link: Callable[[Link], None],
                 sock: socket.socket) -> None:
        self._configuration = configuration
        self._cid_length = configuration.connection_id_length
        self.limits = limits
        self._on_link = on_link
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._links: dict[bytes, QuicPipe] = {}
        self._all: set[QuicPipe] = set()
        self._handshakes = PendingHandshakes(limits.max_pending_handshakes)
        self._engine = load_engine(DEFAULT_ENGINE)
        self._retry = self._engine.RetryTokenHandler()
        self.retries = 0  #: Retry packets sent (address validation under load)
        self.refused = 0  #: connection attempts refused (full, or a bad Retry token)
        self._transport = None
        self._sender: UdpSender | None = None
        self._closed = asyncio.Event()
        self.port = sock.getsockname()[1]

    @property
    def pending_handshakes(self) -> int:
        return len(self._handshakes)

    @property
    def evicted(self) -> int:
        """Handshakes given up to make room for newcomers."""
        return self._handshakes.evicted

    @property
    def connection_count(self) -> int:
        return len(self._all)

    def connection_made(self, transport) -> None:
        self._transport = transport
        self._sender = UdpSender(transport, self._sock, connected=False, gso=bool(self.limits.quic_gso),
                                 on_error=self.error_received)

    def error_received(self, exc) -> None:
        pass  # ICMP errors of one peer say nothing about the others

    def connection_lost(self, exc) -> None:
        for pipe in list(self._all):
            pipe.connection_lost(exc)
        self._closed.set()

    def close(self) -> None:
        """Close every link (CONNECTION_CLOSE sent) and stop listening."""
        for pipe in list(self._all):
            pipe.abort()
        if self._transport is not None:
            self._transport.close()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def _sendto(self, datagrams) -> None:
        self._sender.send(datagrams)

    def datagram_received(self, data: bytes, addr) -> None:
        # Fast path for 1-RTT (short header) packets of known connections: the destination
        # connection ID sits right after the first byte, with the length we issue.
        if data and not data[0] & 0x80:
            pipe = self._links.get(data[1:1 + self._cid_length])
            if pipe is not None:
                pipe.datagram_received(data, addr)
                return
        engine = self._engine
        try:
            header = engine.parse_header(data, self._cid_length)
        except ValueError:
            return
        pipe = self._links.get(header.destination_cid)
        if pipe is not None:
            pipe.datagram_received(data, addr)
            return
        if not header.version:  # version negotiation, or a short header we do not know
            return
        supported = self._configuration.supported_versions
        if header.version not in supported:
            self._transport.sendto(engine.encode_quic_version_negotiation(source_cid=header.destination_cid,
                                   destination_cid=header.source_cid, supported_versions=supported), addr)
            return
        if not header.initial or len(data) < SMALLEST_MAX_DATAGRAM_SIZE:
            return
        now = self._loop.time()
        original_cid, retry_cid = header.destination_cid, None
        if header.token:
            # We issue no NEW_TOKEN, so a token is one of our Retry tokens.
            try:
                original_cid = self._retry.validate_token(address=addr, destination_cid=header.destination_cid,
                                                          token=header.token, now=now)
            except ValueError:
                self.refused += 1
                handshake_failed("quic", "retry_token")
                return
            retry_cid = header.destination_cid
        elif 2 * len(self._handshakes) >= self.limits.max_pending_handshakes:
            self._send_retry(header, addr, now)
            return
        if len(self._all) >= self.limits.max_quic_connections or not self._handshakes.make_room(now, self._evict):
            self.refused += 1
            handshake_failed("quic", "full")
            self._transport.sendto(engine.refuse_datagram(header.version, header.destination_cid, header.source_cid),
                                   addr)
            return
        self._accept(header, data, addr, original_cid, retry_cid)

    def _send_retry(self, header, addr, now: float) -> None:
        retry_cid = os.urandom(self._cid_length)
        token = self._retry.create_token(address=addr, original_destination_connection_id=header.destination_cid,
                                         retry_source_connection_id=retry_cid, now=now)
        self.retries += 1
        self._transport.sendto(self._engine.encode_quic_retry(
            version=header.version, source_cid=retry_cid, destination_cid=header.source_cid,
            original_destination_cid=header.destination_cid, retry_token=token), addr)

    @staticmethod
    def _evict(link: QuicLink) -> None:
        """Give up a stale handshake to make room (see :mod:`tunnel.carriers.handshakes`)."""
        handshake_failed("quic", "evicted")
        link.close(ErrorCode.TIMEOUT, "handshake evicted: too many handshakes in progress")

    def _accept(self, header, data: bytes, addr, original_cid: bytes, retry_cid: bytes | None) -> None:
        limits = self.limits
        size = datagram_size(limits, peer_route_datagram_size(self._sock.family, addr))
        session = new_session(self._configuration, limits, datagram_size=size,
                              original_destination_connection_id=original_cid, retry_source_connection_id=retry_cid)
        cids = {header.destination_cid, session.host_cid}
        pipes = self._links
        deadline: asyncio.TimerHandle | None = None

        def issued(cid: bytes) -> None:
            cids.add(cid)
            pipes[cid] = pipe

        def retired(cid: bytes) -> None:
            cids.discard(cid)
            pipes.pop(cid, None)

        def terminated() -> None:
            for cid in cids:
                if pipes.get(cid) is pipe:
                    del pipes[cid]
            self._all.discard(pipe)
            release()

        def release() -> None:
            """Authentication done, or the link gone: free the handshake slot."""
            if deadline is not None:
                deadline.cancel()
            self._handshakes.forget(link)

        pipe = QuicPipe(session, self._sendto, addr, self._loop, on_terminated=terminated,
                        on_cid_issued=issued, on_cid_retired=retired)
        link = QuicLink(pipe, Role.RELAY, limits, self._loop, on_handshake_done=release)
        self._all.add(pipe)
        for cid in cids:
            pipes[cid] = pipe
        self._handshakes.admit(link, addr[0], self._loop.time())
        deadline = self._loop.call_later(limits.handshake_timeout, self._handshake_expired, link)
        self._loop.create_task(self._when_ready(link))
        pipe.datagram_received(data, addr)

    @staticmethod
    def _handshake_expired(link: QuicLink) -> None:
        handshake_failed("quic", "timeout")
        link.close(ErrorCode.TIMEOUT, "handshake deadline exceeded")

    async def _when_ready(self, link: QuicLink) -> None:
        try:
            await link.wait_ready()
        except Exception:  # closed first: nothing to hand over
            return
        try:
            self._on_link(link)
        except Exception:
            log.exception("on_link failed")
            link.close(ErrorCode.INTERNAL_ERROR, "internal error")


async def serve_quic(host: str, port: int, *, cert_file: str, key_file: str, limits: Limits,
                     on_link: Callable[[Link], None]) -> QuicServer:
    """Listen for QUIC links on UDP ``host:port`` (port 0 picks one; see ``.port``).

    ``on_link(link)`` runs once a link's QUIC handshake and HELLO exchange are done; the
    relay must call ``link.handshake_done()`` after authenticating it, within
    ``limits.handshake_timeout`` of the connection's first packet, or the link is closed.
    """
    loop = asyncio.get_running_loop()
    config = configuration(limits, is_client=False)
    config.load_cert_chain(cert_file, key_file)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # an IPv6 literal
    sock = udp_socket(family, bind=(host, port))
    server = QuicServer(config, limits, on_link, sock)
    await loop.create_datagram_endpoint(lambda: server, sock=sock)
    return server
