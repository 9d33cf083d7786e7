"""The QUIC carrier: a :class:`tunnel.carriers.base.Link` over aioquic (docs/PROTOCOL.md,
"QUIC mapping"), one QUIC stream per tunneled stream, so that loss on one stream does not
stall the others.

The link's rules are the core session's (:mod:`tunnel.core.session`), its frames ride QUIC
streams by :mod:`tunnel.core.quic_session` (sans-IO); here is the I/O:

- :mod:`~tunnel.carriers.quic.link`: the link, a ``SessionLink`` on a UDP pipe;
- :mod:`~tunnel.carriers.quic.client` / :mod:`~tunnel.carriers.quic.server`: dialling and
  accepting (admission, Retry, connection-ID demultiplexing);
- :mod:`~tunnel.carriers.quic.udp`: sockets, batched sends with GSO, the path's datagram size;
- :mod:`~tunnel.carriers.quic.config`: the QUIC settings both sides use, the congestion
  controller (:mod:`tunnel.core.congestion`) registered, the engine's receive guard.
"""

from tunnel.carriers.quic.client import connect_quic
from tunnel.carriers.quic.link import QuicLink
from tunnel.carriers.quic.server import QuicServer, serve_quic

__all__ = ["QuicLink", "QuicServer", "connect_quic", "serve_quic"]
