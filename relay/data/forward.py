"""Streams that cross a relay-to-relay link (:mod:`relay.data.peering`), both ends.

- :class:`Forwarded` (the relay a worker connected to, holding no agent of the resource):
  the worker's TCP connection is accepted at once; while the relay finds the relay holding
  an agent and opens a stream to it over their peer link (or, when no relay serves the
  resource, waits for an agent: relay.data.endpoints.Endpoint.find_agent), what the worker sends
  waits here (reading paused above :data:`EARLY_LIMIT`, and at once while waiting); then the
  endpoint's :class:`TcpBridge` runs over the stream exactly as over an agent's. Until the
  holding relay answers, a copy of what the worker sent (up to :data:`EARLY_LIMIT`) is kept:
  when that relay refuses the open (``REFUSED``: it lost the agent since the look-up, so
  nothing reached a private service), the connection waits and goes again
  (:class:`ForwardHandler`), within the bounds of a connection waiting for an agent.
- :class:`Splice` (the relay holding the agent): joins the stream from the peer to a new
  stream on the agent's link, both directions, with backpressure: a piece received on one
  stream is queued on the other and credit goes back (``consume``) only once that queue is
  below its high-water mark again, so what a forwarded stream holds here is bounded by its
  windows, as on a worker's TCP connection. FIN and RESET (with its code) cross as they are.
"""

from __future__ import annotations

import logging

from tunnel.bridge.tcp import stream_handler
from tunnel.carriers.base import LinkStream, StreamHandler
from tunnel.wire.constants import ErrorCode
from tunnel.wire.errors import StreamClosedError, UsageError

log = logging.getLogger("relay.forward")

#: Bytes a worker may send before its forwarded stream is open; reading pauses above it.
EARLY_LIMIT = 256 * 1024


class Forwarded:
    """The forwarding state of one worker connection (an ``EndpointBridge`` with no local
    agent); see the module docstring."""

    __slots__ = ("bridge", "early", "held", "eof", "deadline")

    def __init__(self, bridge, deadline: float | None = None) -> None:
        self.bridge = bridge
        self.early: list[bytes] = []
        self.held = 0
        self.eof = False
        #: Loop time until which a connection whose forwarded open was refused may wait for
        #: another try (relay.data.endpoints.Endpoint.find_agent); None before any refusal.
        self.deadline = deadline

    def hold(self, data: bytes) -> None:
        """Bytes from the worker before the stream exists."""
        self.early.append(bytes(data))
        self.held += len(data)
        if self.held > EARLY_LIMIT and self.bridge.transport is not None:
            self.bridge.transport.pause_reading()

    def keep(self, data) -> bool:
        """A copy of bytes sent on a forwarded stream the peer relay has not answered yet,
        to send again if it refuses the open; False (keep no more) above :data:`EARLY_LIMIT`."""
        self.held += len(data)
        if self.held > EARLY_LIMIT:
            self.early = []
            return False
        self.early.append(bytes(data))
        return True

    def attach(self, stream: LinkStream, buffers) -> None:
        """The stream to the holding relay is open: send what waited, then bridge as usual."""
        bridge = self.bridge
        bridge.buffers = buffers
        bridge.attach_stream(stream)
        bridge.forwarded = None
        early, self.early = self.early, []
        for data in early:
            bridge.data_received(data)  # counted, and reading paused if the stream is
        if self.eof:
            bridge.eof_received()
        elif bridge.transport is not None and not stream.paused:
            bridge.transport.resume_reading()


class ForwardHandler(StreamHandler):
    """The handler of a worker connection's stream to the relay holding an agent: the
    bridge's own (``stream_handler``), except that a ``REFUSED`` reset before any byte came
    back goes to ``bridge.forward_refused()`` (relay.data.endpoints.EndpointBridge), which
    sends the connection on again with what it kept (:meth:`Forwarded.keep`)."""

    __slots__ = ("bridge", "side", "refused")

    def __init__(self, bridge) -> None:
        self.bridge = bridge
        self.side = stream_handler(bridge)
        self.refused = False

    def data_received(self, data) -> None:
        self.bridge.retry = None  # the open was taken: never sent again
        self.side.data_received(data)

    def data_received_many(self, pieces: list) -> None:
        self.bridge.retry = None
        self.side.data_received_many(pieces)

    def eof_received(self) -> None:
        self.bridge.retry = None
        self.side.eof_received()

    def reset_received(self, code: int) -> None:
        bridge = self.bridge
        if code == ErrorCode.REFUSED and bridge.retry is not None and not bridge.done:
            self.refused = True
            bridge.forward_refused()
            return
        bridge.retry = None
        self.side.reset_received(code)

    def writable(self) -> None:
        if not self.refused:  # else the connection went on without this stream
            self.side.writable()

    def closed(self) -> None:
        if not self.refused:
            self.side.closed()


class _Half(StreamHandler):
    """The handler of one stream of a :class:`Splice`: what it receives goes to the other."""

    __slots__ = ("splice", "stream", "other", "held", "closed_", "received")

    def __init__(self, splice: "Splice") -> None:
        self.splice = splice
        self.stream: LinkStream | None = None
        self.other: "_Half | None" = None
        self.held = 0  # received, queued on the other stream, not consumed yet
        self.closed_ = False
        self.received = 0  # payload bytes received on this stream

    def data_received(self, data) -> None:
        other = self.other.stream
        n = len(data)
        self.received += n
        try:
            other.write(bytes(data))  # a copy: ``data`` may be a view of the carrier's read buffer
        except StreamClosedError:
            self.stream.reset(ErrorCode.STREAM_CLOSED)
            return
        if other.paused:
            self.held += n
        else:
            self.stream.consume(n)

    def writable(self) -> None:
        # Our queue drained: the other side's pieces waiting for it may be credited now.
        other = self.other
        if other.held:
            n, other.held = other.held, 0
            other.stream.consume(n)

    def eof_received(self) -> None:
        try:
            self.other.stream.write_eof()
        except StreamClosedError:
            pass

    def reset_received(self, code: int) -> None:
        self.other.stream.reset(code)
        self.splice._finish()

    def closed(self) -> None:
        self.closed_ = True
        if self.other.closed_:
            self.splice._finish()


class Splice:
    """Joins a stream from a peer relay to a stream on an agent's link (see the module
    docstring); ``on_done`` is called once when both are over."""

    __slots__ = ("peer", "agent", "on_done", "_done")

    def __init__(self) -> None:
        self.peer = _Half(self)
        self.agent = _Half(self)
        self.peer.other, self.agent.other = self.agent, self.peer
        self.on_done = None
        self._done = False

    @property
    def bytes_to_agent(self) -> int:
        return self.peer.received

    @property
    def bytes_from_agent(self) -> int:
        return self.agent.received

    def connect(self, peer_stream: LinkStream, agent_link, metadata: bytes) -> StreamHandler:
        """Open the agent's stream for ``peer_stream``; return the peer stream's handler.
        Raises ``UsageError`` when the agent's link is closing."""
        self.peer.stream = peer_stream
        self.agent.stream = agent_link.open_stream(metadata, self.agent)
        return self.peer

    def _finish(self) -> None:
        if not self._done:
            self._done = True
            callback, self.on_done = self.on_done, None
            if callback is not None:
                callback()


__all__ = ["EARLY_LIMIT", "ForwardHandler", "Forwarded", "Splice", "UsageError"]
