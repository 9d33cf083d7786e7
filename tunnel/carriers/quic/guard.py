"""aioquic under the QUIC carrier: its connection, and what is taken from its internals.

aioquic's public API covers everything the carrier does but four things, taken through the
internal names in :data:`RELIED_ON` (checked against the installed aioquic by
``tests/unit/test_quic_config.py``):

- receive memory: aioquic doubles a stream's MAX_STREAM_DATA (and MAX_DATA) once half of it has
  *arrived*, out-of-order bytes included, and zero-fills the gap before them: a peer sending one
  byte at the edge of each new limit makes it allocate hundreds of MB in under a second.
  :class:`GuardedConnection` moves the limits with what was delivered in order, one window
  ahead, so a link holds at most its receive bound however its bytes arrive;
- how many streams the peer may open at once: fixed at 128, below ``max_concurrent_streams``
  (a pool of 200 database sessions would see the 129th wait): raised before the handshake;
- pacing: aioquic's pacer lets at most 16 packets go per wake-up, and the event loop wakes a
  sender about every millisecond: 0.01 Gbit/s with 1452-byte datagrams on loopback, 10-40x
  below the same transfer with :class:`BurstPacer` (a burst of :data:`PACING_BURST`, at the
  congestion model's rate);
- how far a stream was sent (:func:`guarded_connection`'s ``sent_offset``): the link keeps
  what it hands aioquic unsent small, and stops answering a peer that reads none of it.
"""

from __future__ import annotations

from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.congestion.base import register_congestion_control
from aioquic.quic.connection import QuicConnection
from aioquic.quic.recovery import QuicPacketPacer

from tunnel.core.congestion import NAME, ModelCongestionControl

__all__ = ["RELIED_ON", "BurstPacer", "GuardedConnection", "QuicConfiguration", "events", "guarded_connection"]

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
#: Pace at least this many datagrams a round trip (aioquic charges a packet a whole datagram,
#: and the model's rate on a link that carried little is low).
PACING_FLOOR_PACKETS = 4


class BurstPacer(QuicPacketPacer):
    """aioquic's pacer with a burst of at least :data:`PACING_BURST` seconds, at the model's
    ``pacing_rate`` (its window stays above the BDP on purpose), else at window / RTT."""

    def __init__(self, *, max_datagram_size: int, congestion) -> None:
        super().__init__(max_datagram_size=max_datagram_size)
        self._congestion = congestion
        self._floor = PACING_FLOOR_PACKETS * max_datagram_size

    def update_rate(self, congestion_window: int, smoothed_rtt: float) -> None:
        rate = getattr(self._congestion, "pacing_rate", None)
        if rate:  # the window that paces at that rate, or at least a few datagrams a round trip
            congestion_window = max(rate * max(smoothed_rtt, 1e-6), self._floor)
        super().update_rate(congestion_window=congestion_window, smoothed_rtt=smoothed_rtt)
        # aioquic charges each packet a whole datagram: after a pause a request goes at once.
        self.bucket_max = max(self.bucket_max, self.packet_time, PACING_BURST)


class GuardedConnection(QuicConnection):
    """aioquic's connection with receive limits a window (and an eighth, for batching) ahead
    of what was delivered in order: ``stream_window`` per stream, ``connection_window`` for
    all (a reset's undelivered bytes count as delivered)."""

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


def guarded_connection(config: QuicConfiguration, limits, peer_streams: int, **kwargs) -> tuple:
    """``(connection, sent_offset)``: a :class:`GuardedConnection` whose peer may open
    ``peer_streams`` streams at once, and ``sent_offset(stream_id)``, how far a stream was sent
    (None once aioquic forgot it)."""
    conn = GuardedConnection(configuration=config, stream_window=limits.max_stream_window,
                             connection_window=limits.receive_bound, **kwargs)
    conn._local_max_streams_bidi.value = conn._local_max_streams_bidi.sent = peer_streams
    streams = conn._streams

    def sent_offset(stream_id: int) -> int | None:
        stream = streams.get(stream_id)
        return None if stream is None else stream.sender.highest_offset

    return conn, sent_offset
