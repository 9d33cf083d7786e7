"""Fixtures of the Link contract suite: a connected pair of links over each carrier, with a
path in the middle that a test can make go silent.

Carriers: ``tcp`` (the session over plain TCP), ``wss`` (the session over TLS WebSocket),
``quic`` and ``quic-qh3`` (the agent's side on the optional QUIC engine qh3, the relay's on
aioquic as always; skipped when qh3 is not installed). The client side is the agent's, the
server side the relay's. Every case of
test_link_contract.py runs over each, on uvloop and on asyncio (``run``, tests/conftest.py).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from tests.helpers import make_pki
from tunnel import codec as frames
from tunnel.carriers.base import Link, LinkHandler, LinkStream, StreamHandler
from tunnel.carriers.quic import connect_quic, serve_quic
from tunnel.carriers.tcp import open_tcp_link, serve_tcp_links
from tunnel.carriers.wss import connect_wss, serve_wss
from tunnel.core.limits import Limits
from tunnel.quic_engine import available

CARRIERS = ["tcp", "wss", "quic", "quic-qh3"]


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("contract-pki"))


@pytest.fixture(params=CARRIERS)
def carrier(request) -> str:
    if request.param == "quic-qh3" and not available("qh3"):
        pytest.skip("the optional QUIC engine qh3 is not installed (pip install 'tunnel-agent-relay[qh3]')")
    return request.param




# --- recording handlers ----------------------------------------------------------------


class Recorder(StreamHandler):
    """Keeps what a stream's handler hears; consumes received bytes unless told not to."""

    def __init__(self, consume: bool = True) -> None:
        self.stream: LinkStream | None = None
        self.consume = consume
        self.data = bytearray()
        self.eof = False
        self.reset: int | None = None
        self.writable_calls = 0
        self.is_closed = False
        self.calls: list[str] = []

    def data_received(self, data) -> None:
        self.calls.append("data")
        self.data += data
        if self.consume:
            self.stream.consume(len(data))

    def eof_received(self) -> None:
        self.calls.append("eof")
        self.eof = True

    def reset_received(self, code: int) -> None:
        self.calls.append("reset")
        self.reset = code

    def writable(self) -> None:
        self.calls.append("writable")
        self.writable_calls += 1

    def closed(self) -> None:
        self.calls.append("closed")
        self.is_closed = True


class Side(LinkHandler):
    """One link's handler: accepts streams with a fresh :class:`Recorder` (or what
    ``on_stream`` returns) and keeps control messages and the close."""

    def __init__(self, on_stream=None) -> None:
        self.on_stream = on_stream
        self.streams: list[tuple[LinkStream, StreamHandler]] = []
        self.controls: list[dict] = []
        self.closed: tuple[int, str] | None = None
        self.closed_count = 0
        self.in_call = False  # set while the test is inside a Link method

    def stream_opened(self, stream: LinkStream):
        assert not self.in_call, "stream_opened called re-entrantly"
        handler = self.on_stream(stream) if self.on_stream else Recorder()
        if isinstance(handler, Recorder):
            handler.stream = stream
        if handler is not None:
            self.streams.append((stream, handler))
        return handler

    def control_received(self, message: dict) -> None:
        assert not self.in_call, "control_received called re-entrantly"
        self.controls.append(message)

    def link_closed(self, code: int, reason: str) -> None:
        self.closed_count += 1
        self.closed = (code, reason)


# --- a path that can go silent -----------------------------------------------------------


class _Path:
    """A relay of bytes (TCP) or datagrams (UDP) between the client and the server, with an
    optional one-way ``delay`` (seconds), that :meth:`go_silent` turns into a black hole."""

    def __init__(self, delay: float) -> None:
        self.silent = False
        self.delay = delay
        self.port = 0
        self._closers: list = []
        self._from_server: list = []  # TCP: the path's connections to the server

    def forward(self, send, *args) -> None:
        if self.silent:
            return
        if self.delay:
            asyncio.get_running_loop().call_later(self.delay, self._late, send, args)
        else:
            send(*args)

    def _late(self, send, args) -> None:
        if not self.silent:
            send(*args)

    def go_silent(self) -> None:
        self.silent = True

    def stop_reading_from_server(self) -> None:
        """TCP: stop reading what the server sends, so that its socket and then its writes
        back up (a client that never reads)."""
        for half in self._from_server:
            if half.transport is not None:
                half.transport.pause_reading()

    def close(self) -> None:
        for close in self._closers:
            close()


async def _tcp_path(target_port: int, delay: float) -> _Path:
    path = _Path(delay)
    loop = asyncio.get_running_loop()

    class Half(asyncio.Protocol):
        def __init__(self, peer=None) -> None:
            self.peer = peer
            self.transport = None
            self.pending = []

        def connection_made(self, transport) -> None:
            self.transport = transport
            for chunk in self.pending:
                transport.write(chunk)

        def data_received(self, data) -> None:
            if path.silent or self.peer is None:
                return
            path.forward(self.peer.send, data)

        def send(self, data) -> None:
            if self.transport is None:
                self.pending.append(data)
            elif not self.transport.is_closing():
                self.transport.write(data)

        def connection_lost(self, exc) -> None:
            if self.peer is not None and self.peer.transport is not None and not path.silent:
                self.peer.transport.close()

    def accept() -> Half:
        inner = Half()
        outer = Half(peer=inner)
        inner.peer = outer
        path._from_server.append(inner)

        async def dial() -> None:
            try:
                await loop.create_connection(lambda: inner, "127.0.0.1", target_port)
            except OSError:
                if outer.transport is not None:
                    outer.transport.close()

        loop.create_task(dial())
        return outer

    server = await loop.create_server(accept, "127.0.0.1", 0)
    path.port = server.sockets[0].getsockname()[1]
    path._closers.append(server.close)
    return path


async def _udp_path(target_port: int, delay: float) -> _Path:
    path = _Path(delay)
    loop = asyncio.get_running_loop()
    state = {"client": None}

    class Front(asyncio.DatagramProtocol):
        def connection_made(self, transport) -> None:
            self.transport = transport

        def datagram_received(self, data, addr) -> None:
            state["client"] = addr
            path.forward(back.transport.sendto, data)

    class Back(asyncio.DatagramProtocol):
        def connection_made(self, transport) -> None:
            self.transport = transport

        def datagram_received(self, data, addr) -> None:
            if state["client"] is not None:
                path.forward(front.transport.sendto, data, state["client"])

    _, front = await loop.create_datagram_endpoint(Front, local_addr=("127.0.0.1", 0))
    _, back = await loop.create_datagram_endpoint(Back, remote_addr=("127.0.0.1", target_port))
    path.port = front.transport.get_extra_info("sockname")[1]
    path._closers += [front.transport.close, back.transport.close]
    return path


# --- a peer that breaks the rules -----------------------------------------------------------


def send_raw_frames(link: Link, ftype: int, payload: bytes, count: int = 1) -> None:
    """Send ``count`` control frames of type ``ftype`` where the link's control frames go (the
    session's byte pipe; QUIC's control stream), past every check of the sending side."""
    link._pipe.write([frames.encode_frame(int(ftype), 0, 0, payload) * count])


def stop_reading(pair: "Pair") -> None:
    """The client stops reading what the server sends: over TCP the path stops reading from
    the server, over QUIC the client's control stream gives no credit back."""
    if pair.engine != "aioquic":
        pytest.skip(f"{pair.engine} has no hook to withhold a stream's credit (the relay's bound, aioquic's, "
                    "is the same as on the quic carrier, which checks it)")
    if pair.client.carrier == "quic":
        # A QUIC stack of its own, that never gives the control stream credit back.
        client = pair.client._pipe.session.connection
        write_limits = client._write_stream_limits
        client._write_stream_limits = lambda builder, space, stream: (
            None if stream.stream_id == 0 else write_limits(builder=builder, space=space, stream=stream))
        control = pair.server._pipe.session.connection._streams[0]
        control.max_stream_data_remote = control.sender.highest_offset
    else:
        pair.path.stop_reading_from_server()


# --- the pair ------------------------------------------------------------------------------


@dataclass
class Pair:
    client: Link
    server: Link
    client_side: Side
    server_side: Side
    path: _Path
    closers: list = field(default_factory=list)
    engine: str = "aioquic"  # the client's QUIC engine

    def close(self) -> None:
        for close in [self.client.close, self.server.close, *self.closers, self.path.close]:
            try:
                close()
            except Exception:  # already closed
                pass


@pytest.fixture
def open_pair(carrier, pki, cleanup):
    """``await open_pair(limits=..., server_limits=..., server_side=..., client_side=...,
    install=True, delay=0.0)``: a connected (client, server) pair over the carrier under test,
    each with its handler installed (``install=False``: install the client's yourself), over
    a path with ``delay`` seconds each way."""
    async def make(limits: Limits | None = None, server_limits: Limits | None = None,
                   client_side: Side | None = None, server_side: Side | None = None,
                   install: bool = True, delay: float = 0.0) -> Pair:
        limits = limits or Limits()
        server_limits = server_limits or limits
        server_side = server_side or Side()
        client_side = client_side or Side()
        accepted: asyncio.Future = asyncio.get_running_loop().create_future()
        engine = "qh3" if carrier == "quic-qh3" else "aioquic"

        def on_link(link: Link) -> None:
            link.set_handler(server_side)
            link.handshake_done()
            if not accepted.done():
                accepted.set_result(link)

        if carrier == "tcp":
            server = await serve_tcp_links("127.0.0.1", 0, limits=server_limits, on_link=on_link)
            path = await _tcp_path(server.sockets[0].getsockname()[1], delay)
            client = await open_tcp_link("127.0.0.1", path.port, limits=limits)
            await client.wait_ready()
            closers = [server.close]
        elif carrier == "wss":
            server = await serve_wss("127.0.0.1", 0, ssl_context=pki.server_context(), limits=server_limits,
                                     on_link=on_link)
            path = await _tcp_path(server.sockets[0].getsockname()[1], delay)
            client = await connect_wss(f"wss://localhost:{path.port}", ssl_context=pki.client_context(),
                                       limits=limits, timeout=20)
            closers = [server.close]
        else:
            server = await serve_quic("127.0.0.1", 0, cert_file=str(pki.cert_file), key_file=str(pki.key_file),
                                      limits=server_limits, on_link=on_link)
            path = await _udp_path(server.port, delay)
            client = await connect_quic("127.0.0.1", path.port, ca_file=str(pki.ca_file), server_name="localhost",
                                        limits=limits, timeout=20, engine=engine)
            closers = [server.close]
        server_link = await asyncio.wait_for(accepted, 20)
        if install:
            client.set_handler(client_side)
        pair = Pair(client, server_link, client_side, server_side, path, closers, engine)
        cleanup.append(pair.close)
        return pair

    return make
