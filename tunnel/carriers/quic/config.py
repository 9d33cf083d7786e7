"""QUIC settings both sides of a link use, and the connection each side's engine gives.

The relay's side, and by default the agent's, run on aioquic, guarded where its public API
falls short (:mod:`~tunnel.carriers.quic.guard`, imported only then). The agent's side may run
on qh3 (``TUNNEL_QUIC_ENGINE``, :mod:`tunnel.quic_engine`), through its public API only (the
namespace maps how far the control stream was sent, and keeps PINGs behind queued data): its
peer may open 100 streams at once (fixed: the relay queues the rest), and its native receive
path takes no guard (its peer is the relay it verified). The relay's side is always aioquic: a
qh3 server fails aioquic clients' first flight (qh3 2.1.0), and the relay, open to
unauthenticated peers, needs the guard.
"""

from __future__ import annotations

import dataclasses
import ssl

from tunnel.core.congestion import NAME
from tunnel.core.limits import Limits
from tunnel.core.quic_session import CONTROL_STREAM_ID, QuicSession
from tunnel.core.session_state import Role
from tunnel.quic_engine import DEFAULT_ENGINE, load_engine
from tunnel.wire.constants import QUIC_ALPN

__all__ = ["ALGORITHMS", "configuration", "new_session"]

#: ``Limits.quic_congestion_control`` -> the engine's controller name.
ALGORITHMS = {"bbr": NAME, "cubic": "cubic", "reno": "reno"}


def configuration(limits: Limits, *, is_client: bool, engine: str = DEFAULT_ENGINE):
    """ALPN, idle timeout, congestion control and certificate checks from ``limits``. QUIC's
    own windows sit above the core's (the core's credit decides what is sent: see
    :mod:`tunnel.core.quic_session`), so that they never hold a stream back. ``engine`` names
    the QUIC engine (:mod:`tunnel.quic_engine`; another than aioquic only for the client)."""
    if engine != DEFAULT_ENGINE and not is_client:
        raise ValueError(f"the relay's side of QUIC runs on {DEFAULT_ENGINE} only, not {engine}")
    if engine == DEFAULT_ENGINE:
        from tunnel.carriers.quic.guard import QuicConfiguration as factory
    else:
        factory = load_engine(engine).QuicConfiguration
    return factory(
        alpn_protocols=[QUIC_ALPN],
        is_client=is_client,
        idle_timeout=limits.keepalive_timeout,
        max_data=limits.receive_bound,
        max_stream_data=limits.max_stream_window,
        congestion_control_algorithm=ALGORITHMS[limits.quic_congestion_control],
        verify_mode=ssl.CERT_REQUIRED,
    )


def new_session(config, limits: Limits, *, datagram_size: int, engine: str = DEFAULT_ENGINE,
                **kwargs) -> QuicSession:
    """A connection sending datagrams of ``datagram_size`` bytes, in a :class:`QuicSession`
    for the agent's side (client) or the relay's. ``config`` comes from :func:`configuration`
    with the same ``engine`` (aioquic, or for the client another engine of
    :mod:`tunnel.quic_engine`). ``kwargs`` go to ``QuicConnection`` (the server's connection
    IDs)."""
    config = dataclasses.replace(config, max_datagram_size=datagram_size)
    if engine != DEFAULT_ENGINE:  # the client only (see configuration())
        return _engine_session(engine, config, limits)
    from tunnel.carriers.quic.guard import events, guarded_connection

    peer_streams = _peer_streams(limits)
    conn, sent_offset = guarded_connection(config, limits, peer_streams, **kwargs)
    role = Role.AGENT if config.is_client else Role.RELAY
    return QuicSession(conn, events, role=role, alpn=QUIC_ALPN, max_frame_size=limits.max_frame_size,
                       max_control_size=limits.max_control_size, max_open_metadata=limits.max_open_metadata,
                       max_streams=peer_streams, sent_offset=sent_offset)


def _peer_streams(limits: Limits) -> int:
    """Streams the peer may open at once: ours, the control stream, and slack for streams QUIC
    still tracks after the core is done with them (their last ACKs)."""
    return limits.max_concurrent_streams + 1 + max(8, limits.max_concurrent_streams // 8)


def _engine_session(name: str, config, limits: Limits) -> QuicSession:
    """The client's :class:`QuicSession` on engine ``name`` (qh3), through its public API."""
    engine = load_engine(name)
    conn = engine.QuicConnection(configuration=config)
    conn.track_sent(CONTROL_STREAM_ID)
    return QuicSession(conn, engine.events, role=Role.AGENT, alpn=QUIC_ALPN, max_frame_size=limits.max_frame_size,
                       max_control_size=limits.max_control_size, max_open_metadata=limits.max_open_metadata,
                       max_streams=_peer_streams(limits), sent_offset=conn.sent_offset)
