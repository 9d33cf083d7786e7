"""The QUIC carrier: a :class:`tunnel.carriers.base.Link` over QUIC (docs/PROTOCOL.md, "QUIC
mapping"), each tunneled stream on its own QUIC stream, so that loss on one does not stall the
others. The link's rules are the core session's, its frames ride QUIC streams by the sans-IO
:mod:`tunnel.core.quic_session`; here is the I/O: :mod:`~.link` (a ``SessionLink`` on a UDP
pipe), :mod:`~.client` and :mod:`~.server` (dialling; accepting: admission, Retry, connection
IDs), :mod:`~.udp` (sockets, GSO, datagram size), :mod:`~.config` (settings, engines) and
:mod:`~.guard` (aioquic's connection where its public API falls short).
"""

from tunnel.carriers.quic.client import connect_quic
from tunnel.carriers.quic.link import QuicLink
from tunnel.carriers.quic.server import QuicServer, serve_quic

__all__ = ["QuicLink", "QuicServer", "connect_quic", "serve_quic"]
