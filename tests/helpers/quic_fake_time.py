"""Two :class:`tunnel.carriers.quic.QuicLink` objects wired together in memory, on a loop
whose clock only moves when nothing else is ready (fake time).

No sockets and no real clock: every datagram one link hands to its ``send`` reaches the other
link ``delay`` seconds later on the fake clock, so that timer-driven behaviour (keepalive, QUIC's
idle timeout, loss recovery) plays out in a few milliseconds of real time, the same way on any
machine, however loaded.

    pair = QuicPairInMemory(client_limits, server_limits, pki)
    pair.run_until(lambda: pair.server is not None and pair.server.ready, limit=5.0)
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import ssl
from collections import deque

from aioquic.buffer import Buffer
from aioquic.quic.packet import pull_quic_header

from tunnel.carriers.base import LinkHandler
from tunnel.carriers.quic.config import configuration, new_session
from tunnel.carriers.quic.link import QuicLink, QuicPipe
from tunnel.core.limits import Limits
from tunnel.core.session_state import Role

__all__ = ["FakeLoop", "QuicPairInMemory"]

CLIENT_ADDR = ("10.0.0.1", 40000)
SERVER_ADDR = ("10.0.0.2", 443)


class _Handle:
    __slots__ = ("callback", "args", "cancelled", "when")

    def __init__(self, callback, args, when: float) -> None:
        self.callback = callback
        self.args = args
        self.cancelled = False
        self.when = when

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """The part of an event loop a QuicLink uses (``time``, ``call_soon``, ``call_at``,
    ``call_later``, ``create_future``), on a clock that jumps to the next timer whenever
    nothing is ready."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self._ready: deque = deque()
        self._timers: list = []
        self._seq = itertools.count()

    def time(self) -> float:
        return self.now

    def get_debug(self) -> bool:
        return False

    def call_soon(self, callback, *args, context=None) -> _Handle:
        handle = _Handle(callback, args, self.now)
        self._ready.append(handle)
        return handle

    def call_at(self, when: float, callback, *args, context=None) -> _Handle:
        handle = _Handle(callback, args, when)
        heapq.heappush(self._timers, (when, next(self._seq), handle))
        return handle

    def call_later(self, delay: float, callback, *args, context=None) -> _Handle:
        return self.call_at(self.now + delay, callback, *args)

    def create_future(self) -> asyncio.Future:
        return asyncio.Future(loop=self)

    def run_until(self, condition, limit: float, max_steps: int = 2_000_000) -> bool:
        """Run callbacks (moving the clock as timers come due) until ``condition()`` holds,
        the clock passes ``limit`` seconds from now, or nothing is left to run. Returns
        ``condition()``."""
        end = self.now + limit
        for _ in range(max_steps):
            if condition():
                return True
            if self._ready:
                handle = self._ready.popleft()
            else:
                while self._timers and self._timers[0][2].cancelled:
                    heapq.heappop(self._timers)
                if not self._timers or self._timers[0][0] > end:
                    self.now = end
                    return condition()
                when, _, handle = heapq.heappop(self._timers)
                self.now = max(self.now, when)
            if not handle.cancelled:
                handle.callback(*handle.args)
        raise AssertionError("fake loop: too many steps (a busy loop?)")


class QuicPairInMemory:
    """A client (agent) and a server (relay) QuicLink over an in-memory path with ``delay``
    seconds each way. ``server`` is None until the client's first datagram arrives; the
    handlers are installed once each link is ready."""

    def __init__(self, client_limits: Limits, server_limits: Limits, pki, *, delay: float = 0.001,
                 client_handler: LinkHandler | None = None, server_handler: LinkHandler | None = None,
                 datagram_size: int = 1452) -> None:
        self.loop = FakeLoop()
        self.delay = delay
        self.datagram_size = datagram_size
        self.server_limits = server_limits
        self.server_handler = server_handler
        self.client_handler = client_handler
        self._server_config = configuration(server_limits, is_client=False)
        self._server_config.load_cert_chain(str(pki.cert_file), str(pki.key_file))
        config = configuration(client_limits, is_client=True)
        config.server_name = "localhost"
        config.load_verify_locations(cafile=str(pki.ca_file))
        config.verify_mode = ssl.CERT_REQUIRED
        session = new_session(config, client_limits, datagram_size=datagram_size)
        self.server: QuicLink | None = None
        self._client_pipe = QuicPipe(session, self._from_client, SERVER_ADDR, self.loop)
        self.client = QuicLink(self._client_pipe, Role.AGENT, client_limits, self.loop)
        self._installed: set = set()
        self._client_pipe.start(SERVER_ADDR)

    # --- the path -----------------------------------------------------------------------

    def _from_client(self, datagrams) -> bool:
        for data, _addr in datagrams:
            self.loop.call_later(self.delay, self._to_server, bytes(data))
        return False

    def _from_server(self, datagrams) -> bool:
        for data, _addr in datagrams:
            self.loop.call_later(self.delay, self._client_pipe.datagram_received, bytes(data), SERVER_ADDR)
        return False

    def _to_server(self, data: bytes) -> None:
        if self.server is None:
            header = pull_quic_header(Buffer(data=data), host_cid_length=self._server_config.connection_id_length)
            session = new_session(self._server_config, self.server_limits, datagram_size=self.datagram_size,
                                  original_destination_connection_id=header.destination_cid)
            self._server_pipe = QuicPipe(session, self._from_server, CLIENT_ADDR, self.loop)
            self.server = QuicLink(self._server_pipe, Role.RELAY, self.server_limits, self.loop)
        self._server_pipe.datagram_received(data, CLIENT_ADDR)

    def _install(self) -> None:
        for link, handler in ((self.client, self.client_handler), (self.server, self.server_handler)):
            if link is not None and link.ready and link not in self._installed:
                self._installed.add(link)
                if handler is not None:
                    link.set_handler(handler)
                if link is self.server:
                    link.handshake_done()

    def run_until(self, condition, limit: float) -> bool:
        def check() -> bool:
            self._install()
            return condition()

        return self.loop.run_until(check, limit)
