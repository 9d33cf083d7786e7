"""Userspace delay proxies for the long-fat-path measurement.

    python -m bench.peers.delay --port 7000 --target 127.0.0.1:8000 --delay-ms 25 [--udp]

Listens on TCP ``127.0.0.1:PORT`` (and, with ``--udp``, on UDP at the same port number, as
the relay does for QUIC) and forwards to ``--target``, holding every chunk or datagram for
``--delay-ms`` in **each** direction (so a 25 ms delay makes a 50 ms round trip).

Order is preserved (one FIFO delay line per direction, one timer). Bytes in flight are not
limited by the delay (the line holds whatever arrives during the delay, so the path's window
is the endpoints' business, as on a real long fat path) but a per-direction safety cap
(``--max-buffer``, default 256 MiB, far above any bandwidth-delay product on loopback) pauses
reading if the far side stops draining. TCP half-close is carried through (FIN after the
delay); a reset on one side aborts the other after the delay.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import socket
from typing import Any, Callable

_EOF = object()
_ABORT = object()


class DelayLine:
    """FIFO of items, each delivered ``delay`` seconds after it was pushed, in order."""

    __slots__ = ("loop", "delay", "deliver", "items", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float,
                 deliver: Callable[[list], None]) -> None:
        self.loop = loop
        self.delay = delay
        self.deliver = deliver
        self.items: collections.deque[tuple[float, Any]] = collections.deque()
        self.timer: asyncio.TimerHandle | None = None

    def push(self, item: Any) -> None:
        self.items.append((self.loop.time() + self.delay, item))
        if self.timer is None:
            self.timer = self.loop.call_at(self.items[0][0], self._fire)

    def _fire(self) -> None:
        self.timer = None
        # Deliver everything due now (half a millisecond of slack batches the timer wake-ups).
        horizon = self.loop.time() + 0.0005
        items = self.items
        due = []
        while items and items[0][0] <= horizon:
            due.append(items.popleft()[1])
        if items:
            self.timer = self.loop.call_at(items[0][0], self._fire)
        if due:
            self.deliver(due)

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.items.clear()


# ---------------------------------------------------------------------------------------------
# TCP


class _Side(asyncio.Protocol):
    """One socket of a proxied connection; ``pipe_out`` carries what it reads to the peer."""

    def __init__(self, conn: "_TcpConn", name: str) -> None:
        self.conn = conn
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.peer: "_Side | None" = None
        self.line: DelayLine | None = None   # what this side reads, on its way to the peer
        self.queued = 0                      # bytes in self.line
        self.eof_seen = False
        self.eof_delivered = False           # our FIN has reached the peer
        self.paused_cap = False
        self.paused_peer = False             # the peer's write buffer is full
        self.reading_paused = False
        self.backlog: list = []              # delivered before the peer socket exists

    # -- asyncio callbacks
    def connection_made(self, transport):  # type: ignore[override]
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=4 << 20)
        self.conn.side_connected(self)

    def data_received(self, data):  # type: ignore[override]
        self.queued += len(data)
        self.line.push(data)
        if self.queued > self.conn.max_buffer and not self.paused_cap:
            self.paused_cap = True
            self._update_reading()

    def eof_received(self):  # type: ignore[override]
        self.eof_seen = True
        self.line.push(_EOF)
        return True  # keep the write half open: half-close is carried through

    def connection_lost(self, exc):  # type: ignore[override]
        if not self.eof_seen:
            self.eof_seen = True
            self.line.push(_ABORT if exc is not None else _EOF)
        self.conn.side_lost(self)

    def pause_writing(self):  # type: ignore[override]
        # Our socket is full: stop reading from the peer until it drains.
        if self.peer is not None and not self.peer.paused_peer:
            self.peer.paused_peer = True
            self.peer._update_reading()

    def resume_writing(self):  # type: ignore[override]
        if self.peer is not None and self.peer.paused_peer:
            self.peer.paused_peer = False
            self.peer._update_reading()

    # -- helpers
    def _update_reading(self) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        want_pause = self.paused_cap or self.paused_peer
        if want_pause and not self.reading_paused:
            self.reading_paused = True
            t.pause_reading()
        elif not want_pause and self.reading_paused:
            self.reading_paused = False
            t.resume_reading()

    def deliver(self, items: list) -> None:
        """Delay line callback: write what ``self`` read into the peer's socket."""
        peer = self.peer
        if peer is None or peer.transport is None:
            self.backlog.extend(items)
            return
        t = peer.transport
        chunks = []
        for item in items:
            if item is _EOF or item is _ABORT:
                if chunks:
                    t.writelines(chunks)
                    chunks = []
                if item is _ABORT:
                    t.abort()
                    self.conn.close()
                    return
                if not t.is_closing() and t.can_write_eof():
                    t.write_eof()
                self.eof_delivered = True
                self.conn.maybe_done()
            else:
                self.queued -= len(item)
                chunks.append(item)
        if chunks and not t.is_closing():
            t.writelines(chunks)
        if self.paused_cap and self.queued < self.conn.max_buffer // 2:
            self.paused_cap = False
            self._update_reading()


class _TcpConn:
    def __init__(self, proxy: "TcpDelayProxy") -> None:
        self.proxy = proxy
        self.loop = proxy.loop
        self.max_buffer = proxy.max_buffer
        self.client = _Side(self, "client")
        self.upstream = _Side(self, "upstream")
        self.client.peer, self.upstream.peer = self.upstream, self.client
        self.client.line = DelayLine(self.loop, proxy.delay, self.client.deliver)
        self.upstream.line = DelayLine(self.loop, proxy.delay, self.upstream.deliver)
        self.closed = False

    def side_connected(self, side: _Side) -> None:
        if side is self.client:
            self.loop.create_task(self._dial())
        else:
            # Flush what arrived from the client before the upstream socket existed.
            backlog, self.client.backlog = self.client.backlog, []
            if backlog:
                self.client.deliver(backlog)

    async def _dial(self) -> None:
        host, port = self.proxy.target
        try:
            await self.loop.create_connection(lambda: self.upstream, host, port)
        except OSError:
            self.close()

    def side_lost(self, side: _Side) -> None:
        self.maybe_done()

    def maybe_done(self) -> None:
        if self.client.eof_delivered and self.upstream.eof_delivered:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for side in (self.client, self.upstream):
            if side.transport is not None and not side.transport.is_closing():
                side.transport.close()
        self.proxy.conns.discard(self)


class TcpDelayProxy:
    def __init__(self, target: tuple[str, int], delay: float, max_buffer: int = 256 << 20) -> None:
        self.loop = asyncio.get_running_loop()
        self.target = target
        self.delay = delay
        self.max_buffer = max_buffer
        self.conns: set[_TcpConn] = set()
        self.server: asyncio.base_events.Server | None = None

    def _factory(self) -> _Side:
        conn = _TcpConn(self)
        self.conns.add(conn)
        return conn.client

    async def start(self, host: str, port: int) -> int:
        self.server = await self.loop.create_server(self._factory, host, port, backlog=4096,
                                                    reuse_address=True)
        return self.server.sockets[0].getsockname()[1]

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for c in list(self.conns):
            c.close()


# ---------------------------------------------------------------------------------------------
# UDP (for QUIC)


class _UdpUpstream(asyncio.DatagramProtocol):
    def __init__(self, proxy: "UdpDelayProxy", client_addr) -> None:
        self.proxy = proxy
        self.client_addr = client_addr
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: list[bytes] = []
        loop = proxy.loop
        self.to_upstream = DelayLine(loop, proxy.delay, self._send_up)
        self.to_client = DelayLine(loop, proxy.delay, self._send_down)

    def connection_made(self, transport):  # type: ignore[override]
        self.transport = transport
        pending, self.pending = self.pending, []
        for d in pending:
            transport.sendto(d)

    def datagram_received(self, data, addr):  # type: ignore[override]
        self.to_client.push(data)

    def _send_up(self, items: list) -> None:
        if self.transport is None:
            self.pending.extend(items)
            return
        for d in items:
            self.transport.sendto(d)

    def _send_down(self, items: list) -> None:
        t = self.proxy.transport
        if t is None:
            return
        for d in items:
            t.sendto(d, self.client_addr)

    def close(self) -> None:
        self.to_upstream.cancel()
        self.to_client.cancel()
        if self.transport is not None:
            self.transport.close()


class UdpDelayProxy(asyncio.DatagramProtocol):
    MAX_SESSIONS = 1024

    def __init__(self, target: tuple[str, int], delay: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.target = target
        self.delay = delay
        self.transport: asyncio.DatagramTransport | None = None
        self.sessions: dict[Any, _UdpUpstream] = {}

    async def start(self, host: str, port: int) -> int:
        self.transport, _ = await self.loop.create_datagram_endpoint(
            lambda: self, local_addr=(host, port))
        sock = self.transport.get_extra_info("socket")
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, 8 << 20)
            except OSError:
                pass
        return sock.getsockname()[1]

    def datagram_received(self, data, addr):  # type: ignore[override]
        sess = self.sessions.get(addr)
        if sess is None:
            if len(self.sessions) >= self.MAX_SESSIONS:
                return
            sess = _UdpUpstream(self, addr)
            self.sessions[addr] = sess
            self.loop.create_task(self.loop.create_datagram_endpoint(
                lambda: sess, remote_addr=self.target))
        sess.to_upstream.push(data)

    def close(self) -> None:
        for s in self.sessions.values():
            s.close()
        self.sessions.clear()
        if self.transport is not None:
            self.transport.close()


def _parse_hostport(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host or "127.0.0.1", int(port)


async def _serve(args) -> None:
    target = _parse_hostport(args.target)
    delay = args.delay_ms / 1000.0
    udp = None
    if args.udp:
        udp = UdpDelayProxy(target, delay)
        await udp.start(args.host, args.port)
    tcp = TcpDelayProxy(target, delay, args.max_buffer)
    port = await tcp.start(args.host, args.port)
    print(f"delay proxy on {args.host}:{port} -> {args.target}, +{args.delay_ms} ms each way"
          f"{' (tcp+udp)' if udp else ''}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        tcp.close()
        if udp is not None:
            udp.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--target", required=True, help="host:port to forward to")
    ap.add_argument("--delay-ms", type=float, default=25.0, help="added in each direction")
    ap.add_argument("--udp", action="store_true", help="also proxy UDP on the same port number")
    ap.add_argument("--max-buffer", type=int, default=256 << 20)
    args = ap.parse_args(argv)
    try:
        import uvloop  # type: ignore
        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    try:
        runner(_serve(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
