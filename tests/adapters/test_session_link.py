"""SessionLink over TcpPipe on loopback, under uvloop and stock asyncio."""

from __future__ import annotations

import asyncio
import logging
import random

import pytest

from tunnel import codec as frames
from tunnel.carriers.base import LinkHandler, StreamHandler
from tunnel.carriers.pipe import Pipe
from tunnel.carriers.session_link import SessionLink
from tunnel.carriers.tcp import TcpPipe, open_tcp_link, serve_tcp_links
from tunnel.core.limits import DEFAULT_LIMITS
from tunnel.core.session import Session
from tunnel.core.session_state import Role
from tunnel.wire.constants import ErrorCode, FrameType
from tunnel.wire.errors import LinkError

KiB = 1024
MiB = 1024 * KiB

SMALL = DEFAULT_LIMITS.replace(
    initial_stream_window=64 * KiB, session_window=1 * MiB, max_frame_size=32 * KiB,
    send_quantum=16 * KiB, stream_send_high_water=128 * KiB, stream_send_low_water=32 * KiB,
    session_send_high_water=4 * MiB)


class Echo(StreamHandler):
    """Echoes every byte back, consuming once the echo is queued; FIN answered with FIN."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def data_received(self, data) -> None:
        self.stream.write(bytes(data))
        self.stream.consume(len(data))

    def eof_received(self) -> None:
        self.stream.write_eof()


class Server(LinkHandler):
    """Relay side: a handler per resource name."""

    def __init__(self, handlers=None) -> None:
        self.handlers = handlers or {}
        self.links: list[SessionLink] = []
        self.closed: list[tuple] = []
        self.controls: list[dict] = []

    def stream_opened(self, stream):
        factory = self.handlers.get(stream.metadata, Echo)
        return factory(stream)

    def control_received(self, message) -> None:
        self.controls.append(message)

    def link_closed(self, code, reason) -> None:
        self.closed.append((code, reason))


class Collect(StreamHandler):
    """Client side: collects what comes back."""

    def __init__(self, consume: bool = True) -> None:
        loop = asyncio.get_running_loop()
        self.stream = None
        self.data = bytearray()
        self.eof = loop.create_future()
        self.reset = loop.create_future()
        self.consume = consume
        self.writable_calls = 0

    def data_received(self, data) -> None:
        self.data += data
        if self.consume:
            self.stream.consume(len(data))

    def eof_received(self) -> None:
        self.eof.set_result(None)

    def reset_received(self, code) -> None:
        self.reset.set_result(code)

    def writable(self) -> None:
        self.writable_calls += 1



class ClientLink(LinkHandler):
    def __init__(self) -> None:
        self.closed_calls: list[tuple] = []
        self.closed = asyncio.get_running_loop().create_future()

    def link_closed(self, code, reason) -> None:
        self.closed_calls.append((code, reason))
        if not self.closed.done():
            self.closed.set_result((code, reason))


async def start(limits=DEFAULT_LIMITS, handlers=None, late_handler: bool = False):
    server = Server(handlers)
    loop = asyncio.get_running_loop()

    def on_link(link):
        server.links.append(link)
        if late_handler:
            loop.call_later(0.05, link.set_handler, server)
        else:
            link.set_handler(server)

    srv = await serve_tcp_links("127.0.0.1", 0, Role.RELAY, limits, on_link)
    port = srv.sockets[0].getsockname()[1]
    link = await open_tcp_link("127.0.0.1", port, Role.AGENT, limits)
    client = ClientLink()
    link.set_handler(client)
    await link.wait_ready()
    return srv, server, link, client


async def stop(srv, link) -> None:
    link.close()
    await link.wait_closed()
    srv.close()
    await srv.wait_closed()


def open_collect(link, metadata=b"echo", consume=True) -> tuple:
    handler = Collect(consume)
    stream = link.open_stream(metadata, handler)
    handler.stream = stream
    return stream, handler


async def send(stream, data: bytes, chunk: int = 100_000) -> None:
    """Write honouring ``paused`` (waits for ``writable`` via polling the flag)."""
    for i in range(0, len(data), chunk):
        while stream.paused:
            await asyncio.sleep(0.001)
        stream.write(data[i:i + chunk])


def test_echo_many_streams_exact_bytes(run):
    async def main():
        srv, server, link, client = await start()
        rng = random.Random(7)
        payloads = [rng.randbytes(rng.choice([0, 1, 1000, 300_000, 2_000_000])) for _ in range(8)]
        streams = [open_collect(link) for _ in payloads]

        async def one(stream, handler, data):
            await send(stream, data)
            stream.write_eof()
            await asyncio.wait_for(handler.eof, 30)
            assert bytes(handler.data) == data

        await asyncio.gather(*(one(s, h, d) for (s, h), d in zip(streams, payloads)))
        await_clean = asyncio.get_running_loop().time()
        while link.stream_count and asyncio.get_running_loop().time() - await_clean < 10:
            await asyncio.sleep(0.005)
        assert link.stream_count == 0
        assert link.bytes_sent == link.bytes_received == sum(map(len, payloads))
        assert link.peer_address[0] == "127.0.0.1"
        await stop(srv, link)
        await asyncio.wait_for(client.closed, 10)
        assert client.closed_calls == [(0, "")]
        await server.links[0].wait_closed()
        assert len(server.closed) == 1

    run(main())


class HalfCloseServer(StreamHandler):
    """Reads until the client's FIN, then answers with everything it got, reversed."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.buf = bytearray()

    def data_received(self, data) -> None:
        self.buf += data
        self.stream.consume(len(data))

    def eof_received(self) -> None:
        self.stream.write(bytes(self.buf[::-1]))
        self.stream.write_eof()


def test_half_close_both_ways(run):
    async def main():
        srv, server, link, client = await start(handlers={b"rev": HalfCloseServer})
        stream, handler = open_collect(link, b"rev")
        data = bytes(range(256)) * 1000
        stream.write(data)
        stream.write_eof()  # our direction ends; the answer still flows back
        await asyncio.wait_for(handler.eof, 20)
        assert bytes(handler.data) == data[::-1]
        assert not handler.reset.done()
        await stop(srv, link)

    run(main())


class Stall(StreamHandler):
    """Never consumes: the stream's window fills and the peer must stop sending."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.got = 0
        self.consuming = False

    def data_received(self, data) -> None:
        self.got += len(data)
        if self.consuming:
            self.stream.consume(len(data))

    def resume(self) -> None:
        self.consuming = True
        self.stream.consume(self.got)


def test_stalled_stream_does_not_block_another(run, wait_until):
    async def main():
        stalls = []

        def stall(stream):
            h = Stall(stream)
            stalls.append(h)
            return h

        srv, server, link, client = await start(SMALL, handlers={b"stall": stall})
        stalled, _ = open_collect(link, b"stall")
        stalled.write(b"s" * (4 * MiB))  # far beyond its 64 KiB window
        stream, handler = open_collect(link)
        data = random.Random(1).randbytes(5 * MiB)
        await send(stream, data, chunk=64 * KiB)
        stream.write_eof()
        await asyncio.wait_for(handler.eof, 30)
        assert bytes(handler.data) == data
        # The stalled stream got exactly its window and no more.
        assert stalls[0].got == SMALL.initial_stream_window
        assert stalled.send_buffered == 4 * MiB - SMALL.initial_stream_window
        assert stalled.paused
        await stop(srv, link)

    run(main())


def test_backpressure_paused_and_bounded(run, wait_until):
    async def main():
        stalls = []

        def stall(stream):
            h = Stall(stream)
            stalls.append(h)
            return h

        srv, server, link, client = await start(SMALL, handlers={b"stall": stall})
        stream, handler = open_collect(link, b"stall")
        written = 0
        while not stream.paused:
            stream.write(b"x" * 16 * KiB)
            written += 16 * KiB
            await asyncio.sleep(0)
            assert written < 10 * MiB, "never paused"
        # Bounded: what is queued is about the high-water mark, not what a source could push.
        assert written <= SMALL.stream_send_high_water + SMALL.initial_stream_window + 16 * KiB
        await wait_until(lambda: stalls and stalls[0].got == SMALL.initial_stream_window)
        assert stream.send_buffered == written - SMALL.initial_stream_window
        # The receiver frees its window: the sender drains and is told it may write again.
        stalls[0].resume()
        await wait_until(lambda: handler.writable_calls >= 1, what="writable")
        assert not stream.paused
        srv_link = server.links[0]
        assert srv_link.session.received_unconsumed <= SMALL.initial_stream_window
        await stop(srv, link)

    run(main())


def test_handler_exception_resets_only_that_stream(run, caplog):
    class Boom(StreamHandler):
        def __init__(self, stream) -> None:
            self.stream = stream

        def data_received(self, data) -> None:
            raise RuntimeError("bug in one stream")

    async def main():
        srv, server, link, client = await start(handlers={b"boom": Boom})
        bad, bad_handler = open_collect(link, b"boom")
        good, good_handler = open_collect(link)
        bad.write(b"trigger")
        good.write(b"fine")
        good.write_eof()
        assert await asyncio.wait_for(bad_handler.reset, 10) == ErrorCode.INTERNAL_ERROR
        await asyncio.wait_for(good_handler.eof, 10)
        assert bytes(good_handler.data) == b"fine"
        assert not link.is_closing
        await stop(srv, link)

    with caplog.at_level(logging.ERROR, logger="tunnel.carriers.session_link"):
        run(main())
    assert "bug in one stream" in caplog.text


def test_events_wait_for_set_handler_and_control(run):
    async def main():
        srv, server, link, client = await start(late_handler=True)
        stream, handler = open_collect(link)
        stream.write(b"early bytes")
        stream.write_eof()
        link.send_control({"type": "auth", "token": "x"})
        await asyncio.wait_for(handler.eof, 10)
        assert bytes(handler.data) == b"early bytes"
        assert server.controls == [{"type": "auth", "token": "x"}]
        await stop(srv, link)

    run(main())


def test_peer_refuses_stream_by_default(run):
    async def main():
        srv, server, link, client = await start()
        server.stream_opened = lambda stream: LinkHandler.stream_opened(server, stream)
        stream, handler = open_collect(link, b"nope")
        stream.write(b"x" * 100_000)
        assert await asyncio.wait_for(handler.reset, 10) == ErrorCode.REFUSED
        await stop(srv, link)

    run(main())


def test_keepalive_timeout_when_peer_goes_silent(run):
    limits = DEFAULT_LIMITS.replace(keepalive_interval=0.2, keepalive_timeout=0.6)

    async def main():
        loop = asyncio.get_running_loop()
        peer_hello = frames.encode_frame(FrameType.HELLO, 0, 0, frames.encode_hello(1, 1, 65536, 1 << 20, 16384, 10))
        received = bytearray()

        class Silent(asyncio.Protocol):
            """Says HELLO, then never answers anything (a dead relay behind a live socket)."""

            def connection_made(self, transport) -> None:
                transport.write(peer_hello)

            def data_received(self, data) -> None:
                received.extend(data)

        srv = await loop.create_server(Silent, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        link = await open_tcp_link("127.0.0.1", port, Role.AGENT, limits)
        client = ClientLink()
        link.set_handler(client)
        await link.wait_ready()
        started = loop.time()
        code, reason = await asyncio.wait_for(client.closed, 10)
        assert code == ErrorCode.TIMEOUT
        assert loop.time() - started >= 0.5
        await asyncio.wait_for(link.wait_closed(), 10)
        assert client.closed_calls == [(code, reason)]
        # It pinged before giving up.
        kinds = [f[0] for f in frames.FrameDecoder(1 << 20).feed(bytes(received))]
        assert FrameType.PING in kinds and kinds[-1] == FrameType.GOAWAY
        srv.close()
        await srv.wait_closed()

    run(main())


def test_wait_ready_fails_when_link_closes_first(run):
    async def main():
        loop = asyncio.get_running_loop()

        class Rude(asyncio.Protocol):
            def connection_made(self, transport) -> None:
                transport.close()

        srv = await loop.create_server(Rude, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        link = await open_tcp_link("127.0.0.1", port)
        with pytest.raises(LinkError):
            await link.wait_ready()
        await link.wait_closed()
        srv.close()
        await srv.wait_closed()

    run(main())


async def server_stream_seen(server) -> None:
    while not server.links or not server.links[0].stream_count:
        await asyncio.sleep(0.002)


def test_close_resets_streams_and_peer_sees_goaway(run):
    async def main():
        srv, server, link, client = await start()
        stream, handler = open_collect(link)
        stream.write(b"x")
        await asyncio.wait_for(server_stream_seen(server), 10)
        link.close(ErrorCode.NO_ERROR, "bye")
        assert await asyncio.wait_for(handler.reset, 10) == 0
        await link.wait_closed()
        assert client.closed_calls == [(0, "bye")]
        await server.links[0].wait_closed()
        assert len(server.closed) == 1
        srv.close()
        await srv.wait_closed()

    run(main())


def test_tcp_pipe_delivers_early_bytes(run):
    async def main():
        loop = asyncio.get_running_loop()
        pipes = []
        srv = await loop.create_server(lambda: pipes.append(TcpPipe()) or pipes[-1], "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"before receiver")
        await writer.drain()
        while not pipes or not pipes[0]._early:
            await asyncio.sleep(0.002)
        link = SessionLink(pipes[0], Role.RELAY)  # garbage in: closes with PROTOCOL_ERROR
        client = ClientLink()
        link.set_handler(client)
        code, _ = await asyncio.wait_for(client.closed, 10)
        assert code == ErrorCode.PROTOCOL_ERROR
        writer.close()
        srv.close()
        await srv.wait_closed()

    run(main())


class MemoryPipe(Pipe):
    """A pipe the test feeds by hand: what it writes is recorded."""

    peer_address = ("memory", 0)

    def __init__(self) -> None:
        self.written = bytearray()

    def set_receiver(self, receiver) -> None:
        self.receiver = receiver

    def write(self, buffers) -> None:
        for b in buffers:
            self.written += b

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


class Calls(StreamHandler):
    """Records every data call as it comes: ("one", bytes) or ("many", [bytes, ...])."""

    def __init__(self) -> None:
        self.calls: list = []
        self.stream = None

    def data_received(self, data) -> None:
        self.calls.append(("one", bytes(data)))

    def data_received_many(self, pieces) -> None:
        self.calls.append(("many", [bytes(p) for p in pieces]))

    def reset_received(self, code) -> None:
        self.calls.append(("reset", code))


def test_data_of_one_read_reaches_the_handler_in_one_call(run):
    """Several DATA frames of a stream in one received chunk: one handler call with all of
    them (a bridge writes them with one writev), then the events that followed them."""
    relay = Session(Role.RELAY, DEFAULT_LIMITS)  # writes the frames the link under test reads

    async def main():
        pipe = MemoryPipe()
        link = SessionLink(pipe, Role.AGENT, DEFAULT_LIMITS)
        calls = Calls()

        class Accept(LinkHandler):
            def stream_opened(self, stream):
                calls.stream = stream
                return calls

        link.set_handler(Accept())
        await asyncio.sleep(0)  # set_handler delivers from the loop
        hello = b"".join(bytes(b) for b in relay.data_to_send())
        data = [frames.encode_frame(FrameType.DATA, 0, 2, p) for p in (b"a", b"bb", b"ccc")]
        link.pipe_data_received(hello + frames.encode_frame(FrameType.OPEN, 0, 2, b"db") + data[0])
        # The stream's first frame came with its OPEN, as an event; from now on, batches.
        assert calls.calls == [("one", b"a")]
        link.pipe_data_received(b"".join(data))
        assert calls.calls[1:] == [("many", [b"a", b"bb", b"ccc"])]
        link.pipe_data_received(data[1])
        link.pipe_data_received(data[2] + frames.encode_frame(FrameType.RESET, 0, 2, frames.encode_u32(5)))
        assert calls.calls[2:] == [("one", b"bb"), ("one", b"ccc"), ("reset", 5)]
        link.abort()

    run(main())
