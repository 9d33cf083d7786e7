"""The QUIC carrier: a :class:`tunnel.carriers.base.Link` over aioquic (docs/PROTOCOL.md,
"QUIC mapping"), one QUIC stream per tunneled stream, so that loss on one stream does not
stall the others.

- :mod:`~tunnel.carriers.quic.link` and :mod:`~tunnel.carriers.quic.stream`: the link and its
  streams, on the shared link policy;
- :mod:`~tunnel.carriers.quic.client` / :mod:`~tunnel.carriers.quic.server`: dialling and
  accepting (admission, Retry, connection-ID demultiplexing);
- :mod:`~tunnel.carriers.quic.udp`: sockets, batched sends with GSO, the path's datagram size;
- :mod:`~tunnel.carriers.quic.compat`: every use of aioquic's internals, checked by a test;
- :mod:`~tunnel.carriers.quic.congestion`: the model-based congestion controller (after BBR);
- :mod:`~tunnel.carriers.quic.config`: the QUIC settings both sides use.
"""

from tunnel.carriers.quic.client import connect_quic
from tunnel.carriers.quic.link import QuicLink
from tunnel.carriers.quic.server import QuicServer, serve_quic
from tunnel.carriers.quic.stream import QuicLinkStream

__all__ = ["QuicLink", "QuicLinkStream", "QuicServer", "connect_quic", "serve_quic"]
