"""The Link contract (tunnel/carriers/base.py, tunnel/carriers/dispatch.py), the same cases on
every carrier: the session over TCP, the session over TLS WebSocket, and QUIC.

Each case states one promise the relay and the agent rely on without knowing which carrier
moves the bytes.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.contract.conftest import Recorder, Side, send_raw_frames, stop_reading
from tests.helpers import async_wait_until as wait_for
from tunnel.core.limits import Limits
from tunnel.wire.constants import ErrorCode, FrameType
from tunnel.wire.errors import SessionClosed, StreamClosedError, UsageError

KiB = 1024
MiB = 1024 * KiB
#: Small windows and marks so that backpressure shows within a few hundred KiB.
SMALL = Limits(initial_stream_window=64 * KiB, session_window=256 * KiB, max_frame_size=16 * KiB,
               stream_send_high_water=128 * KiB, stream_send_low_water=32 * KiB,
               session_send_high_water=4 * MiB)


async def _open(pair, name: bytes = b"db") -> tuple:
    """Open a stream client -> server; return (client stream, client recorder, server stream,
    server recorder) once the server has it."""
    handler = Recorder()
    stream = pair.client.open_stream(name, handler)
    handler.stream = stream
    count = len(pair.server_side.streams)
    await wait_for(lambda: len(pair.server_side.streams) > count, what="stream at the server")
    server_stream, server_handler = pair.server_side.streams[-1]
    return stream, handler, server_stream, server_handler


def test_bytes_arrive_exactly_both_ways(run, open_pair):
    async def main():
        pair = await open_pair()
        streams = [await _open(pair, f"s{i}".encode()) for i in range(5)]
        for i, (cs, _, ss, _) in enumerate(streams):
            cs.write(bytes([i]) * (100 * KiB + i))
            ss.write(bytes([100 + i]) * (50 * KiB + i))
        for i, (_, ch, _, sh) in enumerate(streams):
            await wait_for(lambda: len(sh.data) == 100 * KiB + i and len(ch.data) == 50 * KiB + i, what="bytes")
            assert sh.data == bytes([i]) * (100 * KiB + i) and ch.data == bytes([100 + i]) * (50 * KiB + i)

    run(main())


def test_half_close_both_ways(run, open_pair):
    """A FIN travels as a half-close; the other direction keeps flowing; both FINs close."""

    async def main():
        pair = await open_pair()
        cs, ch, ss, sh = await _open(pair)
        cs.write(b"request")
        cs.write_eof()
        await wait_for(lambda: sh.eof, what="eof at the server")
        assert sh.data == b"request" and not ch.eof and not sh.is_closed
        ss.write(b"answer after the client's FIN")
        await wait_for(lambda: ch.data == b"answer after the client's FIN", what="answer")
        ss.write_eof()
        await wait_for(lambda: ch.eof and ch.is_closed and sh.is_closed, what="closed both ways")
        assert ch.reset is None and sh.reset is None
        assert ch.calls[-2:] == ["eof", "closed"]

    run(main())


def test_handler_exception_resets_only_that_stream(run, open_pair):
    async def main():
        def on_stream(stream):
            handler = Recorder()
            if stream.metadata == b"bad":
                def explode(data):
                    raise RuntimeError("handler bug")
                handler.data_received = explode
            return handler

        pair = await open_pair(server_side=Side(on_stream))
        good = await _open(pair, b"good")
        bad_stream, bad_handler, _, bad_server = await _open(pair, b"bad")
        bad_stream.write(b"boom")
        await wait_for(lambda: bad_handler.reset is not None, what="reset of the bad stream")
        assert bad_handler.reset == ErrorCode.INTERNAL_ERROR
        assert bad_server.reset == ErrorCode.INTERNAL_ERROR  # its handler heard it too
        cs, ch, ss, sh = good
        cs.write(b"still fine")
        await wait_for(lambda: sh.data == b"still fine", what="other stream")
        assert not pair.client.is_closing and not pair.server.is_closing

    run(main())


def test_write_after_peer_reset_is_dropped_and_after_eof_raises(run, open_pair):
    async def main():
        pair = await open_pair()
        cs, ch, ss, sh = await _open(pair)
        ss.reset(ErrorCode.REFUSED)
        await wait_for(lambda: ch.reset is not None, what="reset at the client")
        assert ch.reset == ErrorCode.REFUSED
        cs.write(b"too late")  # dropped, no exception
        cs.write_eof()
        other, oh, other_server, osh = await _open(pair, b"other")
        other.write_eof()
        with pytest.raises(StreamClosedError):
            other.write(b"after my own FIN")
        assert not pair.client.is_closing

    run(main())


def test_set_handler_never_delivers_from_inside_itself(run, open_pair):
    """Events that arrive before the handler is installed wait; they are delivered from the
    event loop after set_handler returns, in order, never re-entrantly."""

    async def main():
        pair = await open_pair(install=False)
        pair.server.send_control({"type": "first"})
        pair.server.send_control({"type": "second"})
        await asyncio.sleep(0.2)  # let them arrive before any handler exists
        side = pair.client_side
        side.in_call = True
        pair.client.set_handler(side)
        side.in_call = False
        assert side.controls == []  # nothing from inside set_handler
        await wait_for(lambda: len(side.controls) == 2, what="held control messages")
        assert [m["type"] for m in side.controls] == ["first", "second"]

    run(main())


def test_open_metadata_is_bounded(run, open_pair):
    async def main():
        server_limits = Limits(max_open_metadata=1 * KiB)
        pair = await open_pair(limits=Limits(max_open_metadata=4 * KiB), server_limits=server_limits)
        with pytest.raises(UsageError):
            pair.client.open_stream(b"x" * (4 * KiB + 1), Recorder())
        handler = Recorder()
        handler.stream = pair.client.open_stream(b"y" * (2 * KiB), handler)  # ours allows, the peer's not
        await wait_for(lambda: handler.reset is not None, what="refusal of the long OPEN")
        assert handler.reset == ErrorCode.PROTOCOL_ERROR
        assert pair.server_side.streams == []
        cs, ch, ss, sh = await _open(pair, b"z" * 1024)  # at the bound: fine
        assert ss.metadata == b"z" * 1024

    run(main())


def test_refusal(run, open_pair):
    """A stream the application does not want is refused with REFUSED; the link goes on."""

    async def main():
        pair = await open_pair(server_side=Side(on_stream=lambda stream: None))
        handler = Recorder()
        handler.stream = pair.client.open_stream(b"nobody home", handler)
        await wait_for(lambda: handler.reset is not None, what="refusal")
        assert handler.reset == ErrorCode.REFUSED
        assert not pair.client.is_closing

    run(main())


def test_backpressure_pauses_and_resumes(run, open_pair):
    """A receiver that does not consume stalls its sender at a bounded queue; consuming lets
    it go on; every byte arrives."""

    async def main():
        def on_stream(stream):
            return Recorder(consume=False)

        pair = await open_pair(limits=SMALL, server_side=Side(on_stream))
        cs, ch, ss, sh = await _open(pair)
        sh.stream = ss
        chunk = b"p" * (16 * KiB)
        written = 0
        while not cs.paused:
            cs.write(chunk)
            written += len(chunk)
            await asyncio.sleep(0)
            assert written < 8 * MiB, "never paused"
        await asyncio.sleep(0.2)
        assert len(sh.data) <= SMALL.initial_stream_window  # the window bounds what arrives
        assert cs.paused and ch.writable_calls == 0
        sh.consume = True
        ss.consume(len(sh.data))
        await wait_for(lambda: ch.writable_calls > 0, what="writable after consumption")
        cs.write_eof()
        await wait_for(lambda: sh.eof, what="all bytes")
        assert len(sh.data) == written

    run(main())


def test_keepalive_notices_a_silent_path(run, open_pair):
    async def main():
        limits = Limits(keepalive_interval=0.3, keepalive_timeout=1.0)
        pair = await open_pair(limits=limits)
        cs, ch, ss, sh = await _open(pair)
        pair.path.go_silent()
        await wait_for(lambda: pair.client_side.closed is not None, timeout=10, what="client sees the dead path")
        assert pair.client_side.closed[0] == ErrorCode.TIMEOUT
        assert ch.reset is not None  # its streams are over too
        await wait_for(lambda: pair.server_side.closed is not None, timeout=10, what="server sees it too")
        assert pair.server_side.closed[0] == ErrorCode.TIMEOUT

    run(main())


def test_going_away(run, open_pair):
    """GOAWAY: streams already open run to completion, new ones are refused, and the link
    closes (NO_ERROR) once the last stream ended; each side hears link_closed once."""

    async def main():
        pair = await open_pair()
        cs, ch, ss, sh = await _open(pair)
        pair.server.goaway(ErrorCode.NO_ERROR, "maintenance")
        await wait_for(lambda: pair.client.is_closing, what="client learns of the GOAWAY")
        with pytest.raises(SessionClosed):
            pair.client.open_stream(b"new", Recorder())
        cs.write(b"still served")
        await wait_for(lambda: sh.data == b"still served", what="old stream goes on")
        assert pair.client_side.closed is None and pair.server_side.closed is None
        cs.write_eof()
        ss.write_eof()
        await wait_for(lambda: pair.client_side.closed and pair.server_side.closed, what="drained close")
        assert pair.client_side.closed[0] == ErrorCode.NO_ERROR
        assert pair.server_side.closed[0] == ErrorCode.NO_ERROR
        await asyncio.sleep(0.1)
        assert pair.client_side.closed_count == 1 and pair.server_side.closed_count == 1
        assert ch.reset is None and sh.reset is None

    run(main())


def test_close_resets_streams_and_tells_both_sides(run, open_pair):
    async def main():
        pair = await open_pair()
        cs, ch, ss, sh = await _open(pair)
        pair.client.close(ErrorCode.NO_ERROR, "bye")
        await wait_for(lambda: pair.server_side.closed is not None and sh.reset is not None, what="server sees the close")
        await wait_for(lambda: pair.client_side.closed is not None and ch.reset is not None, what="client's own close")
        with pytest.raises(SessionClosed):
            pair.client.open_stream(b"x", Recorder())
        cs.write(b"after close")  # dropped

    run(main())


def test_control_messages_both_ways(run, open_pair):
    async def main():
        pair = await open_pair()
        pair.client.send_control({"type": "auth", "n": 1})
        pair.server.send_control({"type": "registered", "n": 2})
        await wait_for(lambda: pair.server_side.controls and pair.client_side.controls, what="control messages")
        assert pair.server_side.controls == [{"type": "auth", "n": 1}]
        assert pair.client_side.controls == [{"type": "registered", "n": 2}]

    run(main())


def test_control_flood_closes_the_link(run, open_pair):
    async def main():
        pair = await open_pair(server_limits=Limits(max_control_rate=20))
        for i in range(100):
            pair.client.send_control({"type": "noise", "i": i})
        await wait_for(lambda: pair.server_side.closed is not None, what="flood noticed")
        assert pair.server_side.closed[0] == ErrorCode.ENHANCE_YOUR_CALM
        assert len(pair.server_side.controls) <= 20

    run(main())


def test_ping_of_the_wrong_length_closes_the_link(run, open_pair):
    """A PING carries exactly 8 bytes (the answer echoes them): anything else is a protocol
    error that closes the link, on whichever carrier."""

    async def main():
        pair = await open_pair()
        send_raw_frames(pair.client, FrameType.PING, b"short")
        await wait_for(lambda: pair.server_side.closed is not None, what="bad PING noticed")
        assert pair.server_side.closed[0] == ErrorCode.PROTOCOL_ERROR
        await wait_for(lambda: pair.client_side.closed is not None, what="client told")

    run(main())


def test_peer_that_never_reads_our_answers_is_a_flood(run, open_pair):
    """A peer that sends PINGs and never reads the ACKs must not grow our buffers without
    bound: past a bounded backlog of unread answers the link closes (ENHANCE_YOUR_CALM)."""

    async def main():
        pair = await open_pair(server_limits=Limits(max_ping_rate=10**9))
        stop_reading(pair)
        sent = 0
        # Over TCP the kernel's buffers take a few MB before the server's writes back up;
        # a million PINGs (17 MB) are far more than any carrier needs.
        while pair.server_side.closed is None and sent < 1_000_000:
            send_raw_frames(pair.client, FrameType.PING, b"12345678", count=4096)
            sent += 4096
            await asyncio.sleep(0)
        await wait_for(lambda: pair.server_side.closed is not None, timeout=60, what="the flood noticed")
        assert pair.server_side.closed[0] == ErrorCode.ENHANCE_YOUR_CALM

    run(main())


def test_a_stream_opened_after_stalled_ones_gets_its_answer(run, open_pair):
    """The relay opens streams whose receivers stop reading, more than its session window
    holds, and the agent answers each with more than a window; then the relay opens one more:
    its answer arrives in full (the new stream gets credit beyond the exhausted window)."""

    async def main():
        size = 2 * SMALL.initial_stream_window

        def answer(stream):
            stream.write(b"a" * size)
            stream.write_eof()
            return Recorder()

        pair = await open_pair(limits=SMALL, client_side=Side(on_stream=answer))
        await wait_for(lambda: pair.server.ready, what="the relay's side ready")
        stalled = []
        for i in range(SMALL.session_window // SMALL.initial_stream_window + 4):
            handler = Recorder(consume=False)
            handler.stream = pair.server.open_stream(f"stalled{i}".encode(), handler)
            stalled.append(handler)
        held = lambda: sum(len(h.data) for h in stalled)  # noqa: E731
        await wait_for(lambda: held() >= SMALL.session_window - SMALL.initial_stream_window, what="stalled streams fill up")
        reader = Recorder()
        reader.stream = pair.server.open_stream(b"reader", reader)
        await wait_for(lambda: reader.eof, timeout=10, what="the new stream's answer")
        assert len(reader.data) == size

    run(main())


def _window(link, stream) -> int:
    """The receive window the link grants ``stream`` now."""
    return link.session._streams[stream.stream_id].window if hasattr(link, "session") else stream.window


def test_stream_window_grows_with_the_path(run, open_pair):
    """A stream that the window holds back (64 KiB over a 20 ms round trip) gets a larger one,
    up to max_stream_window."""

    async def main():
        limits = Limits(initial_stream_window=64 * KiB, max_stream_window=1 * MiB, session_window=4 * MiB,
                        max_frame_size=16 * KiB)
        pair = await open_pair(limits=limits, delay=0.01)
        cs, ch, ss, sh = await _open(pair)
        total = 0
        while total < 4 * MiB:
            if not cs.paused:
                cs.write(b"w" * (256 * KiB))
                total += 256 * KiB
            await asyncio.sleep(0)
        cs.write_eof()
        await wait_for(lambda: sh.eof, timeout=30, what="bulk data")
        assert len(sh.data) == total
        assert _window(pair.server, ss) > 64 * KiB

    run(main())


def test_stalled_streams_never_stall_a_reading_one(run, open_pair):
    """Receivers that stop reading hold at most their streams' windows; however many of them
    there are (more than the session window holds), a stream whose receiver reads still gets
    every byte, whether it was opened before they filled up or after."""

    async def main():
        def on_stream(stream):
            return Recorder(consume=stream.metadata.startswith(b"reader"))

        pair = await open_pair(limits=SMALL, server_side=Side(on_stream))
        stalled = SMALL.session_window // SMALL.initial_stream_window + 4
        early = await _open(pair, b"reader-early")
        streams = [await _open(pair, f"stalled{i}".encode()) for i in range(stalled)]
        for cs, _, _, _ in streams:
            cs.write(b"s" * (2 * SMALL.initial_stream_window))
        # The stalled receivers fill their windows, together more than the session window.
        held = lambda: sum(len(sh.data) for _, _, _, sh in streams)  # noqa: E731
        await wait_for(lambda: held() >= SMALL.session_window - SMALL.initial_stream_window, what="stalled streams fill up")
        late = await _open(pair, b"reader-late")
        size = 4 * SMALL.session_window
        for cs, _, _, sh in (early, late):
            cs.write(b"r" * size)
            cs.write_eof()
        await wait_for(lambda: early[3].eof and late[3].eof, timeout=10, what="the reading streams' bytes")
        assert len(early[3].data) == size and len(late[3].data) == size
        assert all(len(sh.data) <= SMALL.initial_stream_window for _, _, _, sh in streams)

    run(main())
