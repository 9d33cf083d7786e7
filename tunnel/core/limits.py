"""One configuration object for every limit of a link (session, carriers, bridge).

Each denial-of-service bound is a named field here and is checked in one place
(:meth:`Limits.validate`). Relay and agent accept overrides through environment variables
named ``TUNNEL_<FIELD>`` in upper case (see :meth:`Limits.from_env`) and docs/LIMITS.md. The
relay's own settings (endpoints, quotas) are :class:`relay.settings.RelaySettings`, the
agent's (reconnects, target checks) :class:`agent.settings.AgentSettings`: same variables,
all three :class:`TunnelSettings`, read by :func:`env_overrides`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

from tunnel.wire.constants import MAX_FRAME_SIZE_CAP, MAX_WINDOW, MIN_FRAME_SIZE

KiB = 1024
MiB = 1024 * KiB
#: Fields where 0 is a meaningful value (off, or "derive it").
_MAY_BE_ZERO = ("quic_max_datagram_size", "quic_gso", "link_notsent_lowat")
#: Values of ``quic_congestion_control``.
QUIC_CONGESTION_CONTROLS = ("bbr", "cubic", "reno")


class TunnelSettings:
    """What a frozen settings dataclass overridable by ``TUNNEL_<FIELD>`` variables shares:
    :meth:`replace` and :meth:`from_env`, both ending in the class's own ``validate()``."""

    __slots__ = ()

    def replace(self, **changes):
        """A copy with ``changes``, validated."""
        return dataclasses.replace(self, **changes).validate()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None):
        """Defaults overridden by ``TUNNEL_<FIELD>=...`` variables of ``environ`` (default: the
        process's), validated."""
        return dataclasses.replace(cls(), **env_overrides(cls, environ)).validate()


@dataclasses.dataclass(frozen=True, slots=True)
class Limits(TunnelSettings):
    """Limits of one link. Receive-side values are announced to the peer in HELLO."""

    #: Largest frame payload we accept (and send at most the peer's).
    max_frame_size: int = 256 * KiB
    #: Credit each new stream starts with: 1 Gbit/s x 50 ms round trip is 6.25 MB.
    initial_stream_window: int = 8 * MiB
    #: Largest stream window auto-tuning grows to when the path's bandwidth-delay product
    #: needs more than the initial window (at most the session window).
    max_stream_window: int = 32 * MiB
    #: Credit across all streams of a link; bounds the memory of unconsumed received data.
    session_window: int = 64 * MiB
    #: Streams the peer may hold open towards us at once.
    max_concurrent_streams: int = 8192
    #: Queued outgoing bytes per stream above which the source socket stops being read ...
    stream_send_high_water: int = 1 * MiB
    #: ... and below which it is read again.
    stream_send_low_water: int = 256 * KiB
    #: Queued outgoing bytes per link above which every source socket pauses.
    session_send_high_water: int = 16 * MiB
    #: DATA bytes one stream may send per scheduling round before the next stream's turn.
    send_quantum: int = 64 * KiB
    #: Largest CONTROL (JSON) payload.
    max_control_size: int = 64 * KiB
    #: Send a PING after this much silence from the peer (seconds).
    keepalive_interval: float = 5.0
    #: Declare the link dead after this much silence from the peer (seconds).
    keepalive_timeout: float = 15.0
    #: PINGs per second from the peer above which the link closes (ENHANCE_YOUR_CALM).
    max_ping_rate: int = 50
    #: Stream OPENs plus RESETs per second from the peer above which the link closes.
    max_stream_churn_rate: int = 20000
    #: CONTROL messages per second from the peer above which the link closes.
    max_control_rate: int = 100
    #: Deepest nesting of arrays and objects in a CONTROL message.
    max_control_depth: int = 8
    #: Largest OPEN metadata (the resource name a stream asks for).
    max_open_metadata: int = 4 * KiB
    #: A half-closed stream with no progress for this long is reset (seconds).
    half_close_timeout: float = 120.0
    #: TLS + WebSocket upgrade (or QUIC handshake) + auth must finish within this (seconds).
    handshake_timeout: float = 10.0
    #: Connections still in their handshake that the relay holds at once; more are refused.
    max_pending_handshakes: int = 256
    #: Largest HTTP upgrade request head the relay reads.
    max_http_header_size: int = 16 * KiB
    #: Largest WebSocket message the receiver assembles (frames are a byte stream, so this
    #: only bounds a single WebSocket frame's declared length).
    max_ws_frame_size: int = 4 * MiB
    #: WSS: bytes the kernel may hold unsent on the link's TCP socket (TCP_NOTSENT_LOWAT, both
    #: sides): what a small frame waits behind when a bulk stream fills the link; 0 leaves the
    #: kernel's default (the whole send buffer, megabytes on a long fat path).
    link_notsent_lowat: int = 512 * KiB
    #: QUIC connections one relay holds at once; more are refused (CONNECTION_REFUSED).
    max_quic_connections: int = 10000
    #: QUIC datagram size; 0: from the route MTU (1452 at most, 16384 on loopback-sized routes).
    quic_max_datagram_size: int = 0
    #: 1: send QUIC datagrams in batches with UDP segmentation offload where Linux has it.
    quic_gso: int = 1
    #: QUIC congestion control: "bbr" (model-based, keeps its rate through random loss),
    #: "cubic" or "reno" (aioquic's, halve the window on each loss event).
    quic_congestion_control: str = "bbr"
    #: ``auto://``: how long the QUIC attempt may take before falling back to WSS (seconds).
    quic_probe_timeout: float = 3.0
    #: ``auto://``: while on WSS, how often QUIC is tried again (seconds).
    quic_reprobe_interval: float = 60.0
    #: ``auto://``: the agent's QUIC link is given up after this much silence (seconds; it
    #: PINGs every quarter of it, and QUIC's idle timeout is this, so the relay notices too).
    auto_quic_keepalive_timeout: float = 4.0

    @property
    def receive_bound(self) -> int:
        """Most received bytes a link holds unconsumed, whatever the application does: the
        session window, one more of overdraft for streams starved by others that never read,
        and one stream window (:func:`tunnel.core.policy.overdraft_credit`)."""
        return 2 * self.session_window + self.max_stream_window

    def validate(self) -> "Limits":
        """Raise ``ValueError`` naming the first field out of range; return self."""
        if not MIN_FRAME_SIZE <= self.max_frame_size <= MAX_FRAME_SIZE_CAP:
            raise ValueError(f"max_frame_size must be in [{MIN_FRAME_SIZE}, {MAX_FRAME_SIZE_CAP}]")
        if self.max_open_metadata > MIN_FRAME_SIZE:
            raise ValueError(f"max_open_metadata must be at most {MIN_FRAME_SIZE} (any peer's smallest frame)")
        for name in ("initial_stream_window", "session_window"):
            value = getattr(self, name)
            if not 1 <= value <= MAX_WINDOW:
                raise ValueError(f"{name} must be in [1, {MAX_WINDOW}]")
        if self.session_window < self.initial_stream_window:
            raise ValueError("session_window must be at least initial_stream_window")
        if not self.initial_stream_window <= self.max_stream_window <= MAX_WINDOW:
            raise ValueError("max_stream_window must be at least initial_stream_window (and at most 2^31-1)")
        if not self.stream_send_low_water < self.stream_send_high_water:
            raise ValueError("stream_send_low_water must be below stream_send_high_water")
        if self.keepalive_timeout <= self.keepalive_interval:
            raise ValueError("keepalive_timeout must exceed keepalive_interval")
        if self.quic_max_datagram_size and not 1200 <= self.quic_max_datagram_size <= 16384:
            raise ValueError("quic_max_datagram_size must be 0 (from the path) or in [1200, 16384]")
        if self.quic_gso not in (0, 1):
            raise ValueError("quic_gso must be 0 or 1")
        if self.quic_congestion_control not in QUIC_CONGESTION_CONTROLS:
            raise ValueError(f"quic_congestion_control must be one of {', '.join(QUIC_CONGESTION_CONTROLS)}")
        check_positive(self, _MAY_BE_ZERO)
        return self


def env_overrides(cls, environ: Mapping[str, str] | None = None) -> dict:
    """The fields of the dataclass ``cls`` that ``TUNNEL_<FIELD>`` variables of ``environ``
    (default: the process's) set, converted to the field's type."""
    environ = os.environ if environ is None else environ
    changes = {}
    for field in dataclasses.fields(cls):
        raw = environ.get("TUNNEL_" + field.name.upper())
        if raw is None:
            continue
        kind = {"int": int, int: int, "str": str, str: str}.get(field.type, float)
        try:
            changes[field.name] = kind(raw)
        except ValueError:
            raise ValueError(f"TUNNEL_{field.name.upper()} must be a number, got {raw!r}") from None
    return changes


def check_positive(settings, may_be_zero: tuple[str, ...] = ()) -> None:
    """Raise ``ValueError`` naming the first numeric field of ``settings`` (a dataclass) that
    is not positive (or, for ``may_be_zero``, negative)."""
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        if isinstance(value, str):
            continue
        if value < 0 or (value == 0 and field.name not in may_be_zero):
            raise ValueError(f"{field.name} must be positive")


DEFAULT_LIMITS = Limits().validate()
