"""TcpBridge's receive side on real TCP sockets, under uvloop and asyncio, on the transports of
both TLS engines (the bridge's sockets ride the selected engine's plain transports): credit goes
back only for bytes the kernel took, nothing keeps a view of the buffers the stream's bytes came
in, and a link's bridges never hold more than its LinkBuffers limit."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from tunnel.bridge.tcp import LinkBuffers, TcpBridge, dial_bridge, serve_bridges
from tunnel.carriers import tls
from tunnel.carriers.base import LinkStream
from tunnel.wire.constants import ErrorCode


@pytest.fixture(autouse=True, params=tls.ENGINES)
def engine(request):
    """Every test on each TLS engine's transports; the engine of the environment restored."""
    before = tls.engine()
    tls.select(request.param)
    yield request.param
    tls.select(before)


class FakeStream(LinkStream):
    """Records what the bridge does to its stream."""

    stream_id = 1
    metadata = b"db"

    def __init__(self) -> None:
        self.consumed = 0
        self.reset_code = None

    def write(self, data) -> None:
        pass

    def write_eof(self) -> None:
        pass

    def reset(self, code: int = ErrorCode.NO_ERROR) -> None:
        self.reset_code = code

    def consume(self, n: int) -> None:
        self.consumed += n

    @property
    def paused(self) -> bool:
        return False


async def _bridge_to_a_silent_peer(stream, buffers=None):
    """A bridge connected to a TCP peer that reads nothing (small receive buffer)."""
    loop = asyncio.get_running_loop()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.setblocking(False)
    bridge = TcpBridge(stream, buffers)
    accept = loop.create_task(loop.sock_accept(listener))
    await tls.open_tcp(loop, lambda: bridge, *listener.getsockname())
    peer, _ = await accept
    listener.close()
    return bridge, peer


def _kernel_took(bridge: TcpBridge, written: int) -> int:
    return written - bridge.transport.get_write_buffer_size()


def test_credit_only_for_bytes_the_kernel_took(run, wait_until):
    async def main():
        stream = FakeStream()
        bridge, peer = await _bridge_to_a_silent_peer(stream)
        chunk = bytearray(b"\x42" * 65536)
        written = 0
        for _ in range(256):  # 16 MiB: far more than the kernel buffers hold
            bridge.stream_data(memoryview(chunk))
            written += len(chunk)
            chunk.append(0)  # resizing raises BufferError while a view of it is kept
            del chunk[-1]
            assert stream.consumed <= _kernel_took(bridge, written)
        held = written - stream.consumed
        assert held > 0 and bridge.transport.get_write_buffer_size() > 0
        # The peer reads it all: every byte is credited, in the end exactly what was written.
        peer.setblocking(False)
        loop = asyncio.get_running_loop()
        got = 0
        while got < written:
            got += len(await loop.sock_recv(peer, 1 << 20))
        await wait_until(lambda: stream.consumed == written, 10, "the credit for the rest")
        bridge.transport.close()
        peer.close()

    run(main())


def test_bytes_waiting_for_the_dial_are_copies(run):
    async def main():
        stream = FakeStream()
        buffers = LinkBuffers(1 << 20)
        bridge = TcpBridge(stream, buffers)
        buf = bytearray(b"x" * 100)
        bridge.stream_data(memoryview(buf)[:10])
        buf.extend(b"y")  # a kept view would make this raise BufferError
        assert buffers.held == 10 and stream.consumed == 0

    run(main())


def test_a_link_never_holds_more_than_its_limit(run):
    async def main():
        buffers = LinkBuffers(64 * 1024)
        first, second = FakeStream(), FakeStream()
        a = TcpBridge(first, buffers)  # both still dialling: everything they get is held
        b = TcpBridge(second, buffers)
        a.stream_data(b"a" * 40 * 1024)
        b.stream_data(b"b" * 20 * 1024)
        assert buffers.held == 60 * 1024 and first.reset_code is None and second.reset_code is None
        b.stream_data(b"b" * 8 * 1024)  # would pass the limit: that stream is reset, its bytes let go
        assert second.reset_code == ErrorCode.FLOW_CONTROL_ERROR
        assert buffers.held == 40 * 1024 and first.reset_code is None
        a.fail(ErrorCode.CONNECT_FAILED)
        assert buffers.held == 0

    run(main())


def test_pieces_of_one_batch_leave_in_one_write(run, monkeypatch, wait_until):
    """The pieces a link delivers together go to the socket in one writev, in order, credited
    once the kernel took them; what it does not take waits in the transport as a copy."""
    calls = []
    writev = os.writev

    def counting(fd, buffers):
        calls.append(len(buffers))
        return writev(fd, buffers)

    monkeypatch.setattr(os, "writev", counting)

    async def main():
        stream = FakeStream()
        bridge, peer = await _bridge_to_a_silent_peer(stream)
        buf = bytearray(b"0123456789")
        pieces = [memoryview(buf)[:4], b"abc", memoryview(buf)[4:]]
        bridge.stream_data_many(pieces)
        assert calls == [3] and stream.consumed == 13
        # A batch far larger than the socket takes: the rest is copied into the transport.
        big = bytearray(b"z" * (8 << 20))
        bridge.stream_data_many([memoryview(big)[:1 << 20], memoryview(big)[1 << 20:]])
        big.append(0)  # no view of it is kept
        # Credited: what writev took, no more; the transport's own first send may take some
        # more at once (loopback drains the socket buffer meanwhile on a busy machine), which
        # is credited once the transport drained.
        assert len(calls) == 2 and 13 < stream.consumed <= 13 + _kernel_took(bridge, 8 << 20)
        peer.setblocking(False)
        loop = asyncio.get_running_loop()
        got = bytearray()
        while len(got) < 13 + (8 << 20):
            got += await loop.sock_recv(peer, 1 << 20)
        assert got == b"0123abc456789" + b"z" * (8 << 20)
        await wait_until(lambda: stream.consumed == 13 + (8 << 20), 10, "the credit for the rest")
        bridge.transport.close()
        peer.close()

    run(main())


class Recording(FakeStream):
    """Keeps what the bridge writes to its stream."""

    def __init__(self) -> None:
        super().__init__()
        self.data = b""
        self.eof = False

    def write(self, data) -> None:
        self.data += bytes(data)

    def write_eof(self) -> None:
        self.eof = True


def test_bridges_ride_the_selected_engine_both_ways(run, engine, wait_until):
    """The agent's dialled bridge and the relay's accepted one are on the engine's transports
    (aiofastnet's for ``openssl``, the loop's for ``ssl``), and bytes and a half-close cross."""
    async def main():
        accepted: list[TcpBridge] = []

        def factory() -> TcpBridge:
            accepted.append(TcpBridge(Recording()))
            return accepted[-1]

        server = await serve_bridges(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        dialled = TcpBridge(FakeStream())
        assert await dial_bridge(dialled.stream, dialled, "127.0.0.1", port, 10) is None
        await wait_until(lambda: accepted and accepted[0].transport is not None, 10, "the accepted bridge")
        on = engine == "openssl"
        assert tls.on_engine(dialled.transport) is on and tls.on_engine(accepted[0].transport) is on
        dialled.stream_data_many([b"ping", b"!"])
        dialled.stream_eof()
        await wait_until(lambda: accepted[0].stream.eof, 10, "the half-close")
        assert accepted[0].stream.data == b"ping!" and dialled.stream.consumed == 5
        dialled.transport.abort()
        accepted[0].transport.abort()
        server.close()

    run(main())


def test_a_connection_refused_as_it_is_accepted_leaves_the_next_one_served(run, engine, wait_until):
    """A relay endpoint refuses a worker inside connection_made (allow list, quota): the reset
    reaches that worker, and the next connection, which the kernel may give the same descriptor
    number, is read as usual (aiofastnet's transports once went deaf after such an abort)."""
    accepted: list[TcpBridge] = []

    class Refusing(TcpBridge):
        def connection_made(self, transport) -> None:
            accepted.append(self)
            if len(accepted) == 1:
                self.transport = transport
                self.fail(ErrorCode.REFUSED)
                return
            super().connection_made(transport)

    def client(port: int, data: bytes):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
                return s.recv(1)
        except OSError as exc:
            return exc

    async def main():
        server = await serve_bridges(lambda: Refusing(Recording()), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        first = await loop.run_in_executor(None, client, port, b"one")
        # The reset may reach the client before its send or its shutdown (ECONNRESET, EPIPE,
        # ENOTCONN) or after (end of stream): each is the refusal.
        assert isinstance(first, OSError) or first == b"", first
        second = loop.run_in_executor(None, client, port, b"two")
        await wait_until(lambda: len(accepted) == 2 and accepted[1].stream.eof, 10, "the second connection's bytes")
        assert accepted[1].stream.data == b"two"
        accepted[1].transport.abort()
        await second
        server.close()

    run(main())


@pytest.mark.parametrize("turns", [0, 1, 3])
def test_connections_queued_when_the_server_stops_are_served_not_reset(run, engine, wait_until, turns):
    """A relay endpoint stops listening (drain) while connections are queued in the kernel
    (``turns`` 0) or accepted and still becoming transports (the loop had a turn or more): each
    is served (bytes and half-close reach its bridge), and a connection after the stop is
    refused. A loop's server reset the first kind when it closed and dropped the second; a load
    balancer in TCP mode passed either on to its workers as a clean, empty reply."""
    accepted: list[TcpBridge] = []

    def factory() -> TcpBridge:
        accepted.append(TcpBridge(Recording()))
        return accepted[-1]

    async def main():
        server = await serve_bridges(factory, "127.0.0.1", 0, backlog=16)
        port = server.sockets[0].getsockname()[1]
        # Blocking connects from this thread: the loop gets no turn to accept them, so all
        # three wait in the kernel's accept queue when the server stops.
        queued = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
        for i, s in enumerate(queued):
            s.sendall(b"queued %d" % i)
            s.shutdown(socket.SHUT_WR)
        for _ in range(turns):
            await asyncio.sleep(0)
        before = server.taken
        assert await server.stop() == 3 - before and server.taken == 3
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=10).close()
        await wait_until(lambda: len(accepted) == 3 and all(b.stream.eof for b in accepted), 10,
                         "the queued connections' bytes")
        assert sorted(b.stream.data for b in accepted) == [b"queued 0", b"queued 1", b"queued 2"]
        assert all(tls.on_engine(b.transport) is (engine == "openssl") for b in accepted)
        for s in queued:
            s.close()
        for b in accepted:
            b.transport.abort()

    run(main())
