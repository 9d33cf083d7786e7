"""Who may reach a resource's endpoint: source address rules as CIDR lists.

A resource's own list (``resources create|update --allow``, kept in the state database's
``resources.allow_cidrs`` so every relay of a cluster applies the same rule) replaces the
relay-wide default (``serve --service-allow``, ``RELAY_SERVICE_ALLOW``); with neither, any
source may connect. A connection from any other source is closed at once by the registry.
"""

from __future__ import annotations

import ipaddress

#: At most this many CIDRs per list (checked on every connection: a short linear scan).
MAX_CIDRS = 64

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_cidrs(value) -> tuple[Network, ...]:
    """A list of networks from ``"10.0.0.0/8,192.0.2.7"`` or ``["10.0.0.0/8", …]``; a bare
    address is a one-address network. Raise ``ValueError`` naming the first bad entry."""
    if isinstance(value, str):
        items = [part.strip() for part in value.split(",")]
    elif isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        items = [item.strip() for item in value]
    else:
        raise ValueError("allow must be a list of CIDR strings (or one comma-separated string)")
    items = [item for item in items if item]
    if not items:
        raise ValueError("allow must name at least one CIDR (e.g. 10.0.0.0/8); "
                         "null (or 'default') falls back to the relay's --service-allow")
    if len(items) > MAX_CIDRS:
        raise ValueError(f"allow takes at most {MAX_CIDRS} CIDRs")
    networks = []
    for item in items:
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"not a CIDR: {item[:64]!r} (expected e.g. 10.0.0.0/8 or 2001:db8::/32)") from None
    return tuple(networks)


def format_cidrs(networks) -> str | None:
    """The stored (and shown) form: ``"10.0.0.0/8,192.0.2.7/32"``; None for no list."""
    return None if networks is None else ",".join(str(n) for n in networks)


def stored_cidrs(text: str | None) -> tuple[Network, ...] | None:
    """The networks of a stored ``allow_cidrs`` value (None: the relay default applies)."""
    return parse_cidrs(text) if text else None


def allowed(networks, host: str) -> bool:
    """Whether ``host`` (a peer address as the socket gives it) is inside one of ``networks``;
    always True for ``None`` (no rule). An IPv4 address mapped into IPv6 (``::ffff:a.b.c.d``)
    is checked as the IPv4 address."""
    if networks is None:
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)
