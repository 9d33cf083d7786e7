"""QUIC settings both sides of a link use."""

from __future__ import annotations

import ssl

from aioquic.quic.configuration import QuicConfiguration

from tunnel.carriers.quic.compat import BoundedConnection
from tunnel.carriers.quic.congestion import ALGORITHMS
from tunnel.carriers.quic.udp import MAX_DATAGRAM_SIZE
from tunnel.core.limits import Limits
from tunnel.wire.constants import QUIC_ALPN

__all__ = ["configuration", "stream_limits"]


def configuration(limits: Limits, *, is_client: bool) -> QuicConfiguration:
    """The QUIC settings both sides use: ALPN ``tunnel/1``, windows and idle timeout from
    ``limits``, the congestion controller ``limits.quic_congestion_control`` names (the
    model-based one by default: :mod:`tunnel.carriers.quic.congestion`), handshake datagrams
    of the standard size, certificates always verified."""
    handshake_size = MAX_DATAGRAM_SIZE
    if limits.quic_max_datagram_size:
        handshake_size = min(handshake_size, limits.quic_max_datagram_size)
    return QuicConfiguration(
        alpn_protocols=[QUIC_ALPN],
        is_client=is_client,
        idle_timeout=limits.keepalive_timeout,
        max_data=limits.session_window,
        max_stream_data=limits.initial_stream_window,
        max_datagram_size=handshake_size,  # the link raises it after the handshake
        congestion_control_algorithm=ALGORITHMS[limits.quic_congestion_control],
        verify_mode=ssl.CERT_REQUIRED,
    )


def stream_limits(conn: BoundedConnection, limits: Limits) -> None:
    """Peers may open ``max_concurrent_streams`` bidirectional streams (plus the control stream
    and some slack: a QUIC stream outlives our view of it until both sides' last frames are
    acknowledged, and beyond the limit our answer is a prompt RESET with STREAM_LIMIT, as on
    WSS, not a silent wait) and no unidirectional ones."""
    slack = max(8, limits.max_concurrent_streams // 8)
    conn.set_stream_limits(bidi=limits.max_concurrent_streams + 1 + slack, uni=0)
