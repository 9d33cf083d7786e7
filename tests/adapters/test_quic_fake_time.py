"""The QUIC link's timers on a fake clock: two QuicLinks wired in memory
(tests/helpers/quic_fake_time.py), so that seconds of keepalive and idle timeout take
milliseconds and behave the same on a loaded machine."""

from __future__ import annotations

import pytest

from tests.contract.conftest import Recorder, Side
from tests.helpers import make_pki
from tests.helpers.quic_fake_time import QuicPairInMemory
from tunnel.core.limits import Limits
from tunnel.wire.constants import ErrorCode

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("quic-fake-time-pki"))


def _pair(pki, client_limits: Limits, server_limits: Limits, **kwargs) -> tuple[QuicPairInMemory, Side, Side]:
    client_side = Side(on_stream=lambda stream: Recorder(consume=False))
    server_side = Side(on_stream=lambda stream: Recorder(consume=False))
    pair = QuicPairInMemory(client_limits, server_limits, pki, client_handler=client_side,
                            server_handler=server_side, **kwargs)
    assert pair.run_until(lambda: pair.server is not None and pair.server.ready and pair.client.ready, 10.0)
    return pair, client_side, server_side


def test_fake_pair_moves_bytes_and_notices_silence(pki):
    """The harness itself: a stream's bytes arrive; a silent peer is noticed on the fake clock."""
    limits = Limits(keepalive_interval=1.0, keepalive_timeout=4.0)
    pair, client_side, server_side = _pair(pki, limits, limits)
    handler = Recorder()
    stream = pair.client.open_stream(b"db", handler)
    handler.stream = stream
    stream.write(b"hello")
    assert pair.run_until(lambda: server_side.streams and server_side.streams[0][1].data == b"hello", 5.0)
    pair.delay = 1e9  # every datagram from now on is lost
    assert pair.run_until(lambda: client_side.closed is not None and server_side.closed is not None, 60.0)
    assert client_side.closed[0] == ErrorCode.TIMEOUT and server_side.closed[0] == ErrorCode.TIMEOUT


@pytest.mark.parametrize("sender", ["agent", "relay"])
def test_no_idle_timeout_while_a_stream_waits_for_credit(pki, sender):
    """An ``auto://`` agent (QUIC idle timeout 4 s, keepalive every second) and a relay (keepalive
    every 5 s) move more than the reader takes: the stream, and with it the connection's
    window, waits for credit. Keepalive PINGs of the sending side sit behind that window on the
    control stream: with the agent sending, neither side received a packet for 4 s and both
    declared the link idle while data was still to move ("Idle timeout" under a 6.7 MB GET),
    and once the reader went on, the PINGs that had piled up reached the relay as a PING flood.
    The link must stay up as long as both ends are alive, however long the reader pauses."""
    window = 256 * KiB
    agent = Limits(keepalive_interval=1.0, keepalive_timeout=4.0, initial_stream_window=window,
                   max_stream_window=window, session_window=window)
    relay = Limits(initial_stream_window=window, max_stream_window=window, session_window=window)
    pair, client_side, server_side = _pair(pki, agent, relay)
    link, reader_side = (pair.client, server_side) if sender == "agent" else (pair.server, client_side)
    handler = Recorder()
    stream = link.open_stream(b"db", handler)
    handler.stream = stream
    stream.write(b"x" * (2 * MiB))
    assert pair.run_until(lambda: reader_side.streams and len(reader_side.streams[0][1].data) >= window - 64, 10.0)
    # The reader pauses for 60 s of fake time: nothing may close.
    pair.run_until(lambda: client_side.closed is not None or server_side.closed is not None, 60.0)
    assert client_side.closed is None and server_side.closed is None, (client_side.closed, server_side.closed)
    # ... and once it reads again, everything arrives.
    reader_stream, reader = reader_side.streams[0]
    reader.consume = True
    reader_stream.consume(len(reader.data))
    assert pair.run_until(lambda: len(reader.data) == 2 * MiB, 60.0)
    assert client_side.closed is None and server_side.closed is None


def test_an_ack_held_back_by_pacing_does_not_spin_the_timer(pki):
    """With loopback-sized datagrams, pacing holds an ACK that is due now; aioquic's timer then
    names the present until the clock moves, and the link used to re-arm it for the present
    without end (a spin: on uvloop, whose clock moves in 1 ms steps, until the next step; on
    a fake clock, forever). The bytes arrive, on a clock that moves."""
    pair, client_side, server_side = _pair(pki, Limits(), Limits(), datagram_size=16000)
    handler = Recorder()
    stream = pair.client.open_stream(b"db", handler)
    handler.stream = stream
    server_side.on_stream = lambda s: Recorder(consume=True)
    stream.write(b"x" * (2 * MiB))
    stream.write_eof()
    assert pair.run_until(lambda: server_side.streams and server_side.streams[0][1].eof, 10.0)
    assert len(server_side.streams[0][1].data) == 2 * MiB
    assert pair.client.datagram_size == 16000


def test_stalled_receivers_never_stall_a_reading_stream(pki):
    """The relay opens more streams than its session window holds at one stream window each;
    their receivers never read. The agent answers every stream with more than a window. A
    stream opened after they filled up, whose receiver reads, must still get every byte within
    bounded (fake) time."""
    window = 64 * KiB
    limits = Limits(initial_stream_window=window, max_stream_window=window, session_window=4 * window)
    size = 8 * window
    pair, client_side, server_side = _pair(pki, limits, limits)

    def answer(stream):
        handler = Recorder()
        handler.stream = stream
        stream.write(b"a" * size)
        stream.write_eof()
        return handler

    client_side.on_stream = answer
    stalled = []
    for i in range(8):
        handler = Recorder(consume=False)
        handler.stream = pair.server.open_stream(b"stalled%d" % i, handler)
        stalled.append(handler)
    pair.run_until(lambda: False, 1.0)
    # Until they got data the stalled streams looked like readers: they may take the overdraft.
    assert sum(len(h.data) for h in stalled) <= 2 * limits.session_window + limits.max_stream_window
    reader = Recorder()
    reader.stream = pair.server.open_stream(b"reader", reader)
    assert pair.run_until(lambda: reader.eof, 30.0), f"the reader got {len(reader.data)} of {size} bytes"
    assert len(reader.data) == size
    assert client_side.closed is None and server_side.closed is None
