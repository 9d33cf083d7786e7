"""TcpBridge's receive side on real TCP sockets, under uvloop and asyncio: credit goes back
only for bytes the kernel took, nothing keeps a view of the buffers the stream's bytes came
in, and a link's bridges never hold more than its LinkBuffers limit."""

from __future__ import annotations

import asyncio
import os
import socket

from tunnel.bridge.tcp import LinkBuffers, TcpBridge
from tunnel.carriers.base import LinkStream
from tunnel.wire.constants import ErrorCode


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
    await loop.create_connection(lambda: bridge, *listener.getsockname())
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
