"""The relay's refusal of a connection attempt when it is full: one server Initial packet with
CONNECTION_CLOSE (CONNECTION_REFUSED), built with aioquic's packet builder and Initial keys, so
that the client learns at once instead of retrying into silence. No ``QuicConnection`` is made
for it (its TLS state would cost what the refusal is there to save)."""

from __future__ import annotations

from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE
from aioquic.quic.connection import TRANSPORT_CLOSE_FRAME_CAPACITY
from aioquic.quic.crypto import CryptoPair
from aioquic.quic.packet import QuicErrorCode, QuicFrameType, QuicPacketType
from aioquic.quic.packet_builder import QuicPacketBuilder

__all__ = ["refuse_datagram"]


def refuse_datagram(version: int, source_cid: bytes, destination_cid: bytes) -> bytes:
    """A server Initial packet closing a connection attempt with CONNECTION_REFUSED."""
    crypto = CryptoPair()
    crypto.setup_initial(cid=source_cid, is_client=False, version=version)
    builder = QuicPacketBuilder(host_cid=source_cid, is_client=False, max_datagram_size=SMALLEST_MAX_DATAGRAM_SIZE,
                                peer_cid=destination_cid, version=version)
    builder.start_packet(QuicPacketType.INITIAL, crypto)
    buf = builder.start_frame(QuicFrameType.TRANSPORT_CLOSE, capacity=TRANSPORT_CLOSE_FRAME_CAPACITY)
    buf.push_uint_var(QuicErrorCode.CONNECTION_REFUSED)
    buf.push_uint_var(QuicFrameType.PADDING)
    buf.push_uint_var(0)
    datagrams, _ = builder.flush()
    return datagrams[0]
