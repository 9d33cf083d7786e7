"""Idle QUIC handshakes for flood tests: clients that start a connection and then say nothing.

Each :class:`IdleQuicClient` owns a UDP socket and an aioquic client connection. A *silent* one
sends its first Initial and ignores every answer, like a flood from spoofed addresses (it
never sees a Retry). An *answering* one feeds the server's packets back into its connection,
so it passes address validation and finishes the QUIC handshake, but never sends our HELLO or
authentication: a handshake slot held until the relay gives up on it.
"""

from __future__ import annotations

import asyncio
import ssl

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from tunnel.wire.constants import QUIC_ALPN


class IdleQuicClient(asyncio.DatagramProtocol):
    def __init__(self, answer: bool) -> None:
        self.answer = answer
        self.transport: asyncio.DatagramTransport | None = None
        self.loop = asyncio.get_running_loop()
        self.conn = QuicConnection(configuration=QuicConfiguration(
            is_client=True, alpn_protocols=[QUIC_ALPN], verify_mode=ssl.CERT_NONE, server_name="localhost"))
        self.received = 0

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.conn.connect(transport.get_extra_info("peername"), now=self.loop.time())
        self._flush()

    def datagram_received(self, data: bytes, addr) -> None:
        self.received += 1
        if self.answer:
            self.conn.receive_datagram(data, addr, now=self.loop.time())
            self._flush()

    def _flush(self) -> None:
        for data, _addr in self.conn.datagrams_to_send(now=self.loop.time()):
            self.transport.sendto(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def idle_quic_clients(host: str, port: int, count: int, *, answer: bool) -> list[IdleQuicClient]:
    """Start ``count`` idle QUIC clients against ``host:port`` (close them with ``.close()``)."""
    loop = asyncio.get_running_loop()
    clients = []
    for _ in range(count):
        _, client = await loop.create_datagram_endpoint(lambda: IdleQuicClient(answer), remote_addr=(host, port))
        clients.append(client)
    return clients
