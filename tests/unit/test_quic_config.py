"""The aioquic internals the QUIC carrier still relies on (tunnel/carriers/quic/config.py,
``RELIED_ON``) exist in the installed aioquic, and the receive guard keeps its promise.

An aioquic upgrade that renames or removes one fails here, by name, instead of misbehaving
somewhere inside a link.
"""

from __future__ import annotations

import inspect
import ssl

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicStreamFrame
from aioquic.quic.recovery import QuicPacketPacer

from tunnel.carriers.quic import config, guard
from tunnel.core.limits import Limits


def _client(**kwargs) -> guard.GuardedConnection:
    configuration = QuicConfiguration(is_client=True, alpn_protocols=["tunnel/2"], verify_mode=ssl.CERT_NONE, **kwargs)
    return guard.GuardedConnection(configuration=configuration, stream_window=100, connection_window=1000)


@pytest.mark.parametrize("owner,name", guard.RELIED_ON, ids=lambda v: v if isinstance(v, str) else v.__name__)
def test_aioquic_still_has(owner, name):
    conn = _client()
    obj = {"loss": conn._loss}.get(owner, conn)
    assert hasattr(obj, name), f"aioquic {getattr(owner, '__name__', owner)} has no {name}: update tunnel/carriers/quic/guard.py"


def test_the_pacer_bursts_what_a_timer_tick_needs():
    conn = _client()
    assert isinstance(conn._loss._pacer, guard.BurstPacer)
    pacer = conn._loss._pacer
    conn._loss._cc.pacing_rate = None  # no model rate: window / RTT, as aioquic
    pacer.update_rate(congestion_window=10 * 1452, smoothed_rtt=0.001)  # 116 Mbit/s
    assert pacer.bucket_max >= guard.PACING_BURST
    pacer.bucket_time, pacer.evaluation_time = 0.0, 1.0
    sent = 0
    while pacer.next_send_time(1.002) is None and sent < 1000:
        pacer.update_after_send(1.002)
        sent += 1
    assert sent >= 19  # 2 ms at 14.5 MB/s of 1452-byte packets, in one wake-up
    size = conn.configuration.max_datagram_size
    conn._loss._cc.pacing_rate = 10_000_000.0  # the model's own rate wins over window / RTT
    pacer.update_rate(congestion_window=10 * 1452, smoothed_rtt=0.001)
    assert pacer.packet_time == pytest.approx(size / 10_000_000.0)
    conn._loss._cc.pacing_rate = 1000.0  # an idle link's: a few datagrams a round trip at least,
    pacer.update_rate(congestion_window=10 * 1452, smoothed_rtt=0.001)
    assert pacer.packet_time == pytest.approx(0.001 / guard.PACING_FLOOR_PACKETS)
    assert pacer.bucket_max >= pacer.packet_time  # and a lone packet after a pause goes at once


def test_overridden_methods_keep_their_signatures():
    """The overrides call super() with keyword arguments: the names must match."""
    for ours, theirs in ((guard.GuardedConnection._write_connection_limits, QuicConnection._write_connection_limits),
                         (guard.GuardedConnection._write_stream_limits, QuicConnection._write_stream_limits),
                         (guard.BurstPacer.update_rate, QuicPacketPacer.update_rate)):
        a, b = inspect.signature(ours), inspect.signature(theirs)
        assert list(a.parameters) == list(b.parameters), f"{theirs.__qualname__}: {b} vs {a}"


def test_limits_follow_delivery_not_arrival():
    """Bytes that arrived out of order (a gap before them) do not raise a limit; bytes
    delivered in order move it to one window (and an eighth) ahead of them."""
    conn = _client(max_data=1000, max_stream_data=100)
    conn.send_stream_data(0, b"")
    stream = conn._streams[0]
    stream.receiver.handle_frame(QuicStreamFrame(data=b"x", offset=99))  # one byte at the edge
    conn._local_max_data.used = 100
    conn._write_stream_limits(builder=None, space=None, stream=stream)  # nothing to send: no builder use
    assert stream.max_stream_data_local == 100
    delivered = stream.receiver.handle_frame(QuicStreamFrame(data=b"y" * 60, offset=0))
    assert delivered is not None and stream.receiver.starting_offset() == 60
    before = conn._local_max_data.value
    conn._write_connection_limits(builder=_NoFrames(), space=None)
    assert conn._local_max_data.value == before  # nothing was handed to the link yet


class _NoFrames:
    """A packet builder that must not be asked for a frame."""

    def start_frame(self, *args, **kwargs):
        raise AssertionError("no limit frame was due")


def test_peer_stream_limit_is_raised_before_the_handshake():
    limits = Limits(max_concurrent_streams=1000)
    configuration = config.configuration(limits, is_client=True)
    configuration.verify_mode = ssl.CERT_NONE
    session = config.new_session(configuration, limits, datagram_size=1452)
    assert session.datagram_size == 1452
    assert session.connection._local_max_streams_bidi.value > 1000
