"""The agent's own settings: reconnects, target checks, config polling, the metrics server.
One object, overridable by the same ``TUNNEL_<FIELD>`` environment variables as the link's
:class:`tunnel.core.limits.Limits` (docs/LIMITS.md)."""

from __future__ import annotations

import dataclasses

from tunnel import quic_engine
from tunnel.core.limits import TunnelSettings, check_positive


@dataclasses.dataclass(frozen=True, slots=True)
class AgentSettings(TunnelSettings):
    #: Agent dial timeout towards the private service (seconds).
    connect_timeout: float = 10.0
    #: The first reconnect after a link loss comes within this (seconds, jittered) ...
    reconnect_delay: float = 1.0
    #: ... and each failed attempt doubles the delay, up to this.
    reconnect_max_delay: float = 30.0
    #: A private service with no successful dial for this long is checked with a TCP
    #: connection (seconds; 0: only real dials tell).
    target_check_interval: float = 30.0
    #: The agent's config file is polled for changes this often (seconds; 0: only SIGHUP).
    config_watch_interval: float = 0.0
    #: Connections the METRICS_LISTEN server (/metrics, /live, /ready) serves at once; more
    #: are closed.
    max_metrics_connections: int = 16
    #: The QUIC engine of the agent's QUIC links (``TUNNEL_QUIC_ENGINE``): "aioquic", or
    #: "qh3" when installed (tunnel/quic_engine.py; the relay's side is always aioquic).
    quic_engine: str = quic_engine.DEFAULT_ENGINE

    def validate(self) -> "AgentSettings":
        """Raise ``ValueError`` naming the first field out of range; return self."""
        if self.reconnect_max_delay < self.reconnect_delay:
            raise ValueError("reconnect_max_delay must be at least reconnect_delay")
        check_positive(self, ("target_check_interval", "config_watch_interval"))
        if self.quic_engine not in quic_engine.ENGINES:
            raise ValueError(f"{quic_engine.ENV_VAR} must be one of {', '.join(quic_engine.ENGINES)}, "
                             f"got {self.quic_engine!r}")
        if not quic_engine.available(self.quic_engine):  # told at start, not at the first dial
            raise ValueError(quic_engine.missing(self.quic_engine))
        return self


DEFAULT_AGENT_SETTINGS = AgentSettings().validate()
