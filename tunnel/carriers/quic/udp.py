"""UDP for the QUIC carrier: sockets, batched sends with GSO, and the path's datagram size.

Datagram size (:func:`datagram_size`): the route MTU of the peer's address (``IP_MTU``/
``IPV6_MTU`` of a connected socket; DF set with ``IP_PMTUDISC_DO`` so that an oversize send
fails loudly instead of being fragmented), at most :data:`MAX_DATAGRAM_SIZE` (1452) unless
the route is loopback-sized, then :data:`MAX_PATH_DATAGRAM_SIZE`. It is fixed for the
connection's life: ``Limits.quic_max_datagram_size`` sets it on paths that carry less than
their route says (a tunnel, PPPoE behind a router).
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
import sys

__all__ = [
    "MAX_DATAGRAM_SIZE",
    "MAX_PATH_DATAGRAM_SIZE",
    "SMALLEST_MAX_DATAGRAM_SIZE",
    "UdpSender",
    "datagram_size",
    "peer_route_datagram_size",
    "route_datagram_size",
    "udp_socket",
]

#: The smallest UDP payload QUIC allows (RFC 9000 section 14).
SMALLEST_MAX_DATAGRAM_SIZE = 1200
#: UDP payload size on a standard path (a 1500-byte MTU with IPv6 + UDP headers).
MAX_DATAGRAM_SIZE = 1452
#: UDP payload size where the route carries more (loopback, jumbo-frame LANs): the engine's
#: cost is per packet, so throughput scales almost with the size. aioquic writes a STREAM
#: frame's length in two bytes (at most 16383), so a larger datagram would only carry padding.
MAX_PATH_DATAGRAM_SIZE = 16384
#: Socket buffers; the kernel caps them at net.core.[rw]mem_max.
SOCKET_BUFFER = 8 * 1024 * 1024
_LINUX = sys.platform.startswith("linux")
log = logging.getLogger("tunnel.carriers.quic")
# Linux socket options the socket module does not name.
_IP_MTU_DISCOVER, _IP_PMTUDISC_DO, _IP_MTU = 10, 2, 14
_IPV6_MTU_DISCOVER, _IPV6_PMTUDISC_DO, _IPV6_MTU = 23, 2, 24
_UDP_SEGMENT = 103  # linux/udp.h
_GSO_MAX_SEGMENTS = 64
_GSO_MAX_BYTES = 65000


def udp_socket(family: int, *, bind=None, connect=None) -> socket.socket:
    """A non-blocking UDP socket with large buffers and DF set (we keep it to send with GSO)."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
            except OSError:  # pragma: no cover - platform dependent
                pass
        _set_dont_fragment(sock)
        if bind is not None:
            sock.bind(bind)
        if connect is not None:
            sock.connect(connect)
    except BaseException:
        sock.close()
        raise
    return sock


def _set_dont_fragment(sock: socket.socket) -> None:
    """DF bit on (RFC 9000 section 14). Linux only; elsewhere the kernel's default stays."""
    if not _LINUX:
        return
    opts = [(socket.IPPROTO_IP, _IP_MTU_DISCOVER, _IP_PMTUDISC_DO)]
    if sock.family == socket.AF_INET6:
        opts.insert(0, (socket.IPPROTO_IPV6, _IPV6_MTU_DISCOVER, _IPV6_PMTUDISC_DO))
    for level, opt, value in opts:
        try:
            sock.setsockopt(level, opt, value)
        except OSError:  # pragma: no cover - v6-only socket, odd platform
            pass


def route_datagram_size(sock: socket.socket) -> int:
    """Largest UDP payload the route of a *connected* socket carries, capped at
    :data:`MAX_PATH_DATAGRAM_SIZE` (:data:`MAX_DATAGRAM_SIZE` when the kernel cannot tell)."""
    if not _LINUX:
        return MAX_DATAGRAM_SIZE
    try:
        if sock.family == socket.AF_INET6:
            mtu, overhead = sock.getsockopt(socket.IPPROTO_IPV6, _IPV6_MTU), 48
        else:
            mtu, overhead = sock.getsockopt(socket.IPPROTO_IP, _IP_MTU), 28
    except OSError:
        return MAX_DATAGRAM_SIZE
    return max(SMALLEST_MAX_DATAGRAM_SIZE, min(mtu - overhead, MAX_PATH_DATAGRAM_SIZE))


def datagram_size(limits, route: int) -> int:
    """The datagram size for a path whose route carries ``route`` bytes (see the module
    docstring); ``limits.quic_max_datagram_size`` wins when set."""
    if limits.quic_max_datagram_size:
        return limits.quic_max_datagram_size
    if route >= MAX_PATH_DATAGRAM_SIZE:
        return MAX_PATH_DATAGRAM_SIZE
    return min(route, MAX_DATAGRAM_SIZE)


def peer_route_datagram_size(family: int, addr) -> int:
    """The server's route lookup towards ``addr``: a throwaway connected socket (connect on
    UDP sends nothing) asked for its route MTU."""
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(addr if family == socket.AF_INET6 else addr[:2])
            return route_datagram_size(probe)
    except OSError:
        return MAX_DATAGRAM_SIZE


class UdpSender:
    """Writes a batch of datagrams straight to the socket: runs of equal-sized datagrams to
    one address go out in one ``sendmsg`` with UDP generic segmentation offload (Linux).
    Falls back to the transport (which buffers) when the socket is full, and keeps using it
    while it holds anything, so datagrams leave in order."""

    __slots__ = ("transport", "sock", "connected", "gso", "on_error", "too_big")

    def __init__(self, transport, sock: socket.socket | None, *, connected: bool, gso: bool,
                 on_error=None) -> None:
        self.transport = transport
        self.sock = sock
        self.connected = connected
        self.on_error = on_error  # error_received(exc) of the protocol, for errors we catch
        self.gso = gso and sock is not None and _LINUX and hasattr(socket, "SOL_UDP")
        self.too_big = False  # EMSGSIZE seen (and logged)

    def send(self, datagrams) -> None:
        """Send ``[(data, addr), ...]``. One the kernel refuses as larger than the path MTU
        (EMSGSIZE, DF set) is dropped, and said in the log once: the path carries less than
        its route says (``TUNNEL_QUIC_MAX_DATAGRAM_SIZE`` fixes it)."""
        transport = self.transport
        if transport.is_closing():
            return
        sock = self.sock
        connected = self.connected
        n = len(datagrams)
        i = 0
        while i < n:
            data, addr = datagrams[i]
            j = i + 1
            if self.gso:
                size = len(data)
                total = size
                while j < n and j - i < _GSO_MAX_SEGMENTS:
                    nxt, naddr = datagrams[j]
                    nsize = len(nxt)
                    if naddr != addr or nsize > size or total + nsize > _GSO_MAX_BYTES:
                        break
                    total += nsize
                    j += 1
                    if nsize < size:
                        break
            if sock is not None and not transport.get_write_buffer_size():
                try:
                    if j - i > 1:
                        cmsg = [(socket.SOL_UDP, _UDP_SEGMENT, struct.pack("=H", len(data)))]
                        payload = [b"".join([d for d, _ in datagrams[i:j]])]
                        if connected:
                            sock.sendmsg(payload, cmsg)
                        else:
                            sock.sendmsg(payload, cmsg, 0, addr)
                    elif connected:
                        sock.send(data)
                    else:
                        sock.sendto(data, addr)
                    i = j
                    continue
                except BlockingIOError:
                    pass
                except OSError as exc:
                    if exc.errno == errno.EMSGSIZE:
                        if not self.too_big:
                            self.too_big = True
                            log.warning("QUIC datagrams of %d bytes exceed the path MTU: set "
                                        "TUNNEL_QUIC_MAX_DATAGRAM_SIZE", len(data))
                        i = j
                        continue
                    if j - i > 1:
                        self.gso = False  # no GSO here (old kernel, odd interface): plain sends
                    else:
                        if self.on_error is not None:
                            self.on_error(exc)
                        i = j
                        continue
            for k in range(i, j):
                if connected:
                    transport.sendto(datagrams[k][0])
                else:
                    transport.sendto(datagrams[k][0], datagrams[k][1])
            i = j
