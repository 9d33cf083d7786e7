"""Every aioquic internal the QUIC carrier relies on exists in the installed aioquic.

tunnel/carriers/quic/compat.py is the only module that touches aioquic's private attributes
and methods; it lists them in ``RELIED_ON``. An aioquic upgrade that renames or removes one
fails here, by name, instead of misbehaving somewhere inside a link.
"""

from __future__ import annotations

import ssl

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet_builder import QuicSentPacket
from aioquic.quic.recovery import QuicPacketPacer
from aioquic.quic.stream import QuicStream, QuicStreamSender

from tunnel.carriers.quic import compat


def _live_objects() -> dict:
    """Real aioquic objects of each kind, so that instance attributes are checked too."""
    config = QuicConfiguration(is_client=True, alpn_protocols=["tunnel/1"], verify_mode=ssl.CERT_NONE)
    conn = compat.BoundedConnection(configuration=config)
    qs = conn.new_stream(0)
    return {
        QuicConnection: conn,
        QuicStream: qs,
        QuicStreamSender: QuicStreamSender(0, True),
        QuicPacketPacer: QuicPacketPacer(max_datagram_size=1200),
        "loss": conn._loss,
        "cc": conn._loss._cc,
        "limit": conn._local_max_data,
        "receiver": qs.receiver,
        "sent_packet": QuicSentPacket(epoch=None, in_flight=True, is_ack_eliciting=True, is_crypto_packet=False,
                                      packet_number=0, packet_type=None),
    }


@pytest.mark.parametrize("owner,name", compat.RELIED_ON,
                         ids=lambda v: v if isinstance(v, str) else getattr(v, "__name__", str(v)))
def test_aioquic_still_has(owner, name):
    obj = _live_objects()[owner]
    assert hasattr(obj, name), f"aioquic {getattr(owner, '__name__', owner)} has no {name}: update tunnel/carriers/quic/compat.py"


def test_overridden_methods_keep_their_signatures():
    """The subclass overrides call super() with keyword arguments: the names must match."""
    import inspect

    for cls, method in ((QuicConnection, "_write_connection_limits"), (QuicConnection, "_write_stream_limits"),
                        (QuicConnection, "_parse_transport_parameters"), (QuicStreamSender, "get_frame"),
                        (QuicStreamSender, "on_data_delivery"), (QuicPacketPacer, "update_rate")):
        ours = inspect.signature(getattr({QuicConnection: compat.BoundedConnection,
                                          QuicStreamSender: compat.ChunkSender,
                                          QuicPacketPacer: compat.GranularPacer}[cls], method))
        theirs = inspect.signature(getattr(cls, method))
        assert list(ours.parameters) == list(theirs.parameters), f"{cls.__name__}.{method}: {theirs} vs {ours}"


def test_credit_moves_only_when_granted():
    """The connection hides arrival from aioquic's doubling rule: nothing moves until the link
    grants, and then by the policy's rule (half a window consumed)."""
    config = QuicConfiguration(is_client=True, alpn_protocols=["tunnel/1"], verify_mode=ssl.CERT_NONE,
                               max_data=1000, max_stream_data=100)
    conn = compat.BoundedConnection(configuration=config)
    qs = conn.new_stream(0)
    qs.receiver.highest_offset = 100  # everything arrived, nothing consumed
    conn._local_max_data.used = 100
    assert not conn.grant_stream(qs, consumed=49, window=100)
    assert conn.grant_stream(qs, consumed=50, window=100) and qs.max_stream_data_local == 150
    assert not conn.grant_connection(consumed=100, window=1000)  # 900 left of 1000: not yet
    conn._local_max_data.used = 600  # more arrived: what the peer has left (400) is below
    assert conn.grant_connection(consumed=500, window=1000) and conn._local_max_data.value == 1500


def test_chunk_sender_is_aioquics_sender_with_other_storage():
    """Offsets, pending ranges, FIN and acknowledgement behave as the stock sender's."""
    ours, stock = compat.ChunkSender(0, True), QuicStreamSender(0, True)
    for sender in (ours, stock):
        sender.write(b"abc")
        sender.write(memoryview(b"defgh"))
        sender.write(b"ij", end_stream=True)
    for max_size in (4, 4, 100):
        a, b = ours.get_frame(max_size), stock.get_frame(max_size)
        assert (a.offset, bytes(a.data), a.fin) == (b.offset, bytes(b.data), b.fin)
    from aioquic.quic.packet_builder import QuicDeliveryState

    ours.on_data_delivery(QuicDeliveryState.ACKED, 0, 4, False)
    stock.on_data_delivery(QuicDeliveryState.ACKED, 0, 4, False)
    assert ours._buffer_start == stock._buffer_start == 4
    assert ours._starts == [3, 8] and len(ours._chunks) == 2  # "abc" dropped once acknowledged
