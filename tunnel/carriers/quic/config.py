"""QUIC settings both sides of a link use, and the one thing set on the engine beyond them.

aioquic's public API covers everything the carrier does except three things, taken through
the internal names in :data:`RELIED_ON` (checked against the installed aioquic by
``tests/unit/test_quic_config.py``):

- receive memory: aioquic doubles a stream's MAX_STREAM_DATA (and MAX_DATA) once half of it has
  *arrived*, out-of-order bytes included, and fills the gap before them with zeros; a peer that
  sends one byte at the edge of each new limit makes it allocate without bound in a few packets
  (hundreds of MB in under a second). :class:`GuardedConnection` moves the limits with what was
  delivered in order instead, at most one window ahead, so a link holds at most its receive
  bound (``Limits.receive_bound``) however its bytes arrive;
- how many streams the peer may open at once: aioquic fixes it at 128 (adding one per stream
  the peer finished), below ``max_concurrent_streams``, so a link holding more long-lived
  connections (a pool of database sessions) would see the 129th wait for another to end.
  :func:`new_session` raises it before the handshake announces it;
- pacing: aioquic's pacer lets at most 16 packets go per wake-up, but the event loop wakes a
  sender at most every millisecond or so (its timers' resolution), which caps a link at 16
  packets a millisecond whatever the path carries (measured: 0.01 Gbit/s with 1452-byte
  datagrams on loopback, 10-40x below the same transfer with it). :class:`BurstPacer` is
  aioquic's pacer with a burst of :data:`PACING_BURST`, at the congestion model's rate;
- how far a stream was sent: the control stream's unsent bytes pile up when the peer takes
  none of them, and the link then stops queueing answers to it (the core's guard against a
  peer that never reads, as a full TCP buffer does it on WSS).
"""

from __future__ import annotations

import dataclasses
import ssl

from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.congestion.base import register_congestion_control
from aioquic.quic.connection import QuicConnection
from aioquic.quic.recovery import QuicPacketPacer

from tunnel.core.congestion import NAME, ModelCongestionControl
from tunnel.core.limits import Limits
from tunnel.core.quic_session import QuicSession
from tunnel.core.session_state import Role
from tunnel.wire.constants import QUIC_ALPN

__all__ = ["RELIED_ON", "GuardedConnection", "configuration", "new_session"]

#: ``Limits.quic_congestion_control`` -> the engine's controller name.
ALGORITHMS = {"bbr": NAME, "cubic": "cubic", "reno": "reno"}
register_congestion_control(NAME, ModelCongestionControl)

#: (object, attribute) of aioquic internals used here.
RELIED_ON = [
    (QuicConnection, "_write_connection_limits"),
    (QuicConnection, "_write_stream_limits"),
    (QuicConnection, "_local_max_data"),
    (QuicConnection, "_local_max_streams_bidi"),
    (QuicConnection, "_streams"),
    (QuicConnection, "_loss"),
    ("loss", "_pacer"),
    ("loss", "_cc"),
]
#: Burst the pacer allows, in seconds at its rate: the event loop wakes a paced sender about a
#: millisecond late (uvloop's timers count whole milliseconds), and the burst covers that.
PACING_BURST = 0.002


class BurstPacer(QuicPacketPacer):
    """aioquic's pacer with a burst of at least :data:`PACING_BURST` seconds, at the
    congestion controller's ``pacing_rate`` when it has one (the model of
    :mod:`tunnel.core.congestion` keeps its window above the path's BDP on purpose and sets
    the rate itself), else at window / smoothed RTT as aioquic does."""

    def __init__(self, *, max_datagram_size: int, congestion) -> None:
        super().__init__(max_datagram_size=max_datagram_size)
        self._congestion = congestion

    def update_rate(self, congestion_window: int, smoothed_rtt: float) -> None:
        rate = getattr(self._congestion, "pacing_rate", None)
        if rate:  # the window that paces at that rate
            congestion_window = rate * max(smoothed_rtt, 1e-6)
        super().update_rate(congestion_window=congestion_window, smoothed_rtt=smoothed_rtt)
        self.bucket_max = max(self.bucket_max, PACING_BURST)


class GuardedConnection(QuicConnection):
    """aioquic's connection with receive limits that follow in-order delivery (see the module
    docstring): a stream's limit stays within ``stream_window`` of what it delivered, the
    connection's within ``connection_window`` of what all streams delivered (or a reset
    released); each is raised once less than that is left, by an eighth more, so that limit
    frames go out in batches."""

    def __init__(self, *, stream_window: int, connection_window: int, **kwargs) -> None:
        super().__init__(**kwargs)
        loss = self._loss
        loss._pacer = BurstPacer(max_datagram_size=self.configuration.max_datagram_size, congestion=loss._cc)
        self.stream_window = stream_window
        self.connection_window = connection_window
        self._taken = 0  # stream bytes delivered in order, or released by a reset

    def next_event(self):
        event = super().next_event()
        kind = type(event)
        if kind is events.StreamDataReceived:
            self._taken += len(event.data)
            stream = self._streams.get(event.stream_id)
            if stream is not None and stream.max_stream_data_local:
                delivered = stream.receiver.starting_offset()
                window = self.stream_window
                if stream.max_stream_data_local - delivered < window:
                    stream.max_stream_data_local = delivered + window + (window >> 3)
        elif kind is events.StreamReset:
            stream = self._streams.get(event.stream_id)
            if stream is not None:  # what will never be delivered: its final size
                self._taken += stream.receiver.highest_offset - stream.receiver.starting_offset()
        return event

    def _write_connection_limits(self, builder, space) -> None:
        limit = self._local_max_data
        window = self.connection_window
        if limit.value - self._taken < window:
            limit.value = self._taken + window + (window >> 3)
        used, limit.used = limit.used, 0  # aioquic's doubling on arrival, hidden
        try:
            super()._write_connection_limits(builder=builder, space=space)
        finally:
            limit.used = used

    def _write_stream_limits(self, builder, space, stream) -> None:
        # Runs for every stream in every packet: nothing to do unless a limit moved (above).
        if stream.max_stream_data_local_sent == stream.max_stream_data_local:
            return
        receiver = stream.receiver
        highest, receiver.highest_offset = receiver.highest_offset, 0  # aioquic's doubling, hidden
        try:
            super()._write_stream_limits(builder=builder, space=space, stream=stream)
        finally:
            receiver.highest_offset = highest


def configuration(limits: Limits, *, is_client: bool) -> QuicConfiguration:
    """ALPN, idle timeout, congestion control and certificate checks from ``limits``. QUIC's
    own windows sit above the core's (the core's credit decides what is sent: see
    :mod:`tunnel.core.quic_session`), so that they never hold a stream back."""
    return QuicConfiguration(
        alpn_protocols=[QUIC_ALPN],
        is_client=is_client,
        idle_timeout=limits.keepalive_timeout,
        max_data=limits.receive_bound,
        max_stream_data=limits.max_stream_window,
        congestion_control_algorithm=ALGORITHMS[limits.quic_congestion_control],
        verify_mode=ssl.CERT_REQUIRED,
    )


def new_session(config: QuicConfiguration, limits: Limits, *, datagram_size: int, **kwargs) -> QuicSession:
    """A connection sending datagrams of ``datagram_size`` bytes, in a :class:`QuicSession`
    for the agent's side (client) or the relay's. ``kwargs`` go to ``QuicConnection`` (the
    server's connection IDs)."""
    config = dataclasses.replace(config, max_datagram_size=datagram_size)
    conn = GuardedConnection(configuration=config, stream_window=limits.max_stream_window,
                             connection_window=limits.receive_bound, **kwargs)
    # Peer streams at once: ours, the control stream, and slack for streams QUIC still
    # tracks after the core is done with them (their last ACKs).
    peer_streams = limits.max_concurrent_streams + 1 + max(8, limits.max_concurrent_streams // 8)
    conn._local_max_streams_bidi.value = conn._local_max_streams_bidi.sent = peer_streams
    role = Role.AGENT if config.is_client else Role.RELAY
    streams = conn._streams

    def sent_offset(stream_id: int) -> int | None:
        stream = streams.get(stream_id)
        return None if stream is None else stream.sender.highest_offset

    return QuicSession(conn, events, role=role, alpn=QUIC_ALPN, max_frame_size=limits.max_frame_size,
                       max_control_size=limits.max_control_size, max_open_metadata=limits.max_open_metadata,
                       max_streams=peer_streams, sent_offset=sent_offset)
