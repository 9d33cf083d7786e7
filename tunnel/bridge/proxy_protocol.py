"""PROXY protocol version 2 towards a private service, and the worker address the relay puts
in a stream's OPEN metadata (docs/PROTOCOL.md, "Worker address").

The relay appends ``NUL`` + ``"<src ip> <src port> <dst ip> <dst port>"`` (ASCII) to the
resource name in the OPEN metadata of a stream for an agent that announced the
``worker_address`` feature at ``auth``: the integration worker's address and the endpoint
it connected to. An agent whose resource has ``proxy_protocol = 2`` sends the service a PROXY
v2 header with them before the first byte of the stream (a ``LOCAL`` header when the relay
sent no address: an older relay).
"""

from __future__ import annotations

import asyncio
import ipaddress
import struct

from .tcp import TcpBridge

__all__ = ["ProxyV2Bridge", "format_worker", "parse_metadata", "proxy_v2_header"]

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: The only version the agent speaks.
VERSION = 2


def format_worker(src, dst) -> bytes:
    """The address field of the OPEN metadata for socket addresses ``src`` (the worker) and
    ``dst`` (the endpoint it reached)."""
    return f"{src[0]} {src[1]} {dst[0]} {dst[1]}".encode("ascii")


def parse_metadata(metadata: bytes) -> tuple[str, tuple | None]:
    """``(resource name, (src_ip, src_port, dst_ip, dst_port) or None)`` of an OPEN's metadata.
    An address field that does not parse leaves the whole metadata as the name, which then
    names no resource (the stream is refused)."""
    raw = bytes(metadata)
    name, sep, field = raw.partition(b"\0")
    if not sep:
        return name.decode("utf-8", "replace"), None
    try:
        src_ip, src_port, dst_ip, dst_port = field.decode("ascii").split(" ")
        address = (ipaddress.ip_address(src_ip), int(src_port), ipaddress.ip_address(dst_ip), int(dst_port))
        if not (0 <= address[1] <= 65535 and 0 <= address[3] <= 65535):
            raise ValueError("port out of range")
    except (ValueError, UnicodeDecodeError):
        return raw.decode("utf-8", "replace"), None
    return name.decode("utf-8", "replace"), address


def proxy_v2_header(address: tuple | None) -> bytes:
    """The PROXY v2 header for ``address`` (from :func:`parse_metadata`): ``PROXY`` over TCP
    (IPv4, or IPv6 when either side is IPv6, an IPv4 one then mapped), or ``LOCAL`` for None."""
    if address is None:
        return SIGNATURE + bytes((0x20, 0x00)) + struct.pack("!H", 0)
    src, src_port, dst, dst_port = address
    if src.version == 4 and dst.version == 4:
        family, body = 0x11, src.packed + dst.packed
    else:
        src6 = src if src.version == 6 else ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + src.packed)
        dst6 = dst if dst.version == 6 else ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + dst.packed)
        family, body = 0x21, src6.packed + dst6.packed
    body += struct.pack("!HH", src_port, dst_port)
    return SIGNATURE + bytes((0x21, family)) + struct.pack("!H", len(body)) + body


class ProxyV2Bridge(TcpBridge):
    """The agent's bridge for a resource with ``proxy_protocol = 2``: the header goes to the
    service first, then the stream's bytes."""

    __slots__ = ("header",)

    def __init__(self, stream, buffers, header: bytes) -> None:
        super().__init__(stream, buffers)
        self.header = header

    def connection_made(self, transport: asyncio.Transport) -> None:
        transport.write(self.header)  # ahead of anything the bridge writes (same transport, in order)
        super().connection_made(transport)
