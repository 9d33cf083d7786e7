"""The relay (cloud side): accepts agents, keeps customers, resources and tokens, and gives
integration workers a local ``host:port`` per resource.

In layers, each importing only from those below it (tests/unit/test_layers.py holds them):

- :mod:`relay` (this module)  the names of the state directory's files, address parsing
- :mod:`relay.settings`       the relay's settings (endpoints, quotas, descriptors)
- :mod:`relay.state`          state: ``relay_state`` (customers, resources, tokens, relays,
  agent links; port choice) over ``store/`` (SQLite or PostgreSQL, shared migrations, events),
  ``cluster`` (membership, agent links, revocation on every relay), ``pki`` (CA, certificates,
  TLS contexts), ``files`` (the state directory)
- :mod:`relay.data`           data plane: ``registry`` (endpoints, agents, held connections),
  ``forward`` and ``peering`` (relay-to-relay forwarding), ``quotas``, ``metrics``
- :mod:`relay.control`        control plane: ``server`` (agent links, authentication,
  registration), ``agent_control`` (CONTROL messages), ``names``, ``tokens`` (Ed25519 JWTs),
  ``admin`` (the HTTP/1.1 + JSON admin API) and ``admin_client``
- :mod:`relay.cli`, :mod:`relay.serve`  the entrypoints: ``tunnel-relay`` and its ``serve``
"""

from __future__ import annotations

import ipaddress

__version__ = "0.1.0"

#: Files of the state directory that more than one module names.
ADMIN_TOKEN_FILE = "admin-token"
ADMIN_INFO_FILE = "admin.json"
CA_FILE = "ca.pem"
DATABASE_FILE = "relay.db"
DEFAULT_STATE_DIR = "./relay-state"


def parse_host_port(value: str, default_port: int | None = None) -> tuple[str, int]:
    """Split ``host:port``, ``[v6]:port``, ``:port`` (all interfaces) or ``host`` (with
    ``default_port``) into ``(host, port)``. Raise ``ValueError`` with a clear message."""
    text = value.strip()
    if not text:
        raise ValueError("empty address")
    host: str
    port_text: str | None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"bad address {value!r}: missing ']'")
        host = text[1:end]
        rest = text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"bad address {value!r}")
        port_text = rest[1:] if rest else None
        ipaddress.IPv6Address(host.split("%", 1)[0])
    elif text.count(":") == 1:
        host, port_text = text.split(":")
        host = host or "0.0.0.0"
    elif text.count(":") > 1:
        # A bare IPv6 address without port.
        ipaddress.IPv6Address(text.split("%", 1)[0])
        host, port_text = text, None
    else:
        host, port_text = text, None
    if port_text is None or port_text == "":
        if default_port is None:
            raise ValueError(f"bad address {value!r}: port missing")
        return host, default_port
    if not port_text.isdigit():
        raise ValueError(f"bad address {value!r}: port must be a number")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"bad address {value!r}: port out of range")
    return host, port


def format_host_port(host: str, port: int) -> str:
    """``host:port``, with brackets around an IPv6 literal."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False
