"""The relay's own settings: resource endpoints, per-customer quotas, file descriptors, the
metrics server. One object, overridable by the same ``TUNNEL_<FIELD>`` environment variables
as the link's :class:`tunnel.core.limits.Limits` (docs/LIMITS.md)."""

from __future__ import annotations

import dataclasses

from tunnel.core.limits import TunnelSettings, check_positive


@dataclasses.dataclass(frozen=True, slots=True)
class RelaySettings(TunnelSettings):
    # --- the relay's resource endpoints ---
    #: A worker connection to a resource no agent serves waits this long for one (seconds;
    #: 0: reset at once) ...
    endpoint_hold_timeout: float = 5.0
    #: ... at most this many per resource (more are reset at once) ...
    endpoint_hold_max: int = 64
    #: ... and only within this long after the resource's last agent left or the relay
    #: started (seconds); later, a resource with no agent resets new connections at once.
    endpoint_hold_window: float = 60.0
    # --- relay quotas, per customer (docs/LIMITS.md, "Quotas") ---
    #: Resources one customer may have; registering a new name beyond it is refused.
    max_resources_per_customer: int = 256
    #: Live agent links one customer may hold (across the relays of a cluster).
    max_links_per_customer: int = 512
    #: Registrations (``auth`` messages with a valid token) per customer and minute; a burst
    #: of one minute's worth is allowed.
    max_registrations_per_minute: int = 600
    #: ``target_health`` entries the relay takes from one customer's agents per minute (a
    #: burst of one minute's worth); more are ignored.
    max_target_reports_per_minute: int = 6000
    #: Lines one customer's ``target_health`` reports may make the relay log per minute
    #: (a burst of one minute's worth); more are counted in one line per minute.
    max_target_log_lines_per_minute: int = 30
    #: A resource no agent has served for this long is deleted and its port freed (seconds),
    #: unless an operator issued a JWT naming it (``--resource-id``).
    resource_idle_expiry: float = 30 * 86400.0
    #: Open-file descriptors the relay keeps free for its admin API, database, handshakes.
    fd_reserve: int = 512
    #: Share of the other descriptors one customer may hold (agent links, endpoints and the
    #: connections to them), as a fraction.
    customer_fd_share: float = 0.5
    #: Share of the relay's endpoint port range (``--port-range``) one customer's resources
    #: may hold, as a fraction.
    customer_port_share: float = 0.5
    # --- operations endpoints (--metrics-listen) ---
    #: Connections the /metrics, /live and /ready server serves at once; more are closed.
    max_metrics_connections: int = 16

    def validate(self) -> "RelaySettings":
        """Raise ``ValueError`` naming the first field out of range; return self."""
        if not 0 < self.customer_fd_share <= 1:
            raise ValueError("customer_fd_share must be in (0, 1]")
        if not 0 < self.customer_port_share <= 1:
            raise ValueError("customer_port_share must be in (0, 1]")
        check_positive(self, ("endpoint_hold_timeout",))
        return self


DEFAULT_RELAY_SETTINGS = RelaySettings().validate()
