"""The QUIC carrier (tunnel.carriers.quic) on loopback, under plain asyncio and uvloop, with
the agent's side (the client) on each QUIC engine (aioquic; qh3 when installed) and the relay's
on aioquic, as always."""

from __future__ import annotations

import asyncio
import functools
import sys

import pytest

from tests.helpers import async_wait_until
from tests.helpers.quic_flood import idle_quic_clients
from tunnel import codec as frames
from tunnel.carriers.base import LinkHandler, StreamHandler
from tunnel.carriers.quic import connect_quic, serve_quic
from tunnel.carriers.quic.udp import MAX_PATH_DATAGRAM_SIZE
from tunnel.core.limits import Limits
from tunnel.quic_engine import available
from tunnel.wire.constants import ErrorCode, FrameType
from tunnel.wire.errors import LinkError

pytestmark = pytest.mark.timeout(180)

KiB = 1024
MiB = 1024 * KiB


# --- helpers ---------------------------------------------------------------------------

wait_for = functools.partial(async_wait_until, timeout=60)

@pytest.fixture(autouse=True, params=["aioquic", "qh3"])
def client_engine(request, monkeypatch) -> str:
    """Every case with the client (the agent's side) on each engine: ``connect_quic`` here
    dials with it."""
    engine = request.param
    if engine == "qh3" and not available("qh3"):
        pytest.skip("the optional QUIC engine qh3 is not installed (pip install 'tunnel-agent-relay[qh3]')")
    monkeypatch.setattr(sys.modules[__name__], "connect_quic", functools.partial(connect_quic, engine=engine))
    return engine


class Recorder(LinkHandler):
    def __init__(self, on_stream=None):
        self.controls = []
        self.closed = None
        self.streams = []
        self.on_stream = on_stream
        self.event = asyncio.Event()

    def stream_opened(self, stream):
        handler = self.on_stream(stream) if self.on_stream else Collect(stream)
        self.streams.append((stream, handler))
        self.event.set()
        return handler

    def control_received(self, message):
        self.controls.append(message)
        self.event.set()

    def link_closed(self, code, reason):
        self.closed = (code, reason)
        self.event.set()


class Collect(StreamHandler):
    """Collects and consumes everything; optionally echoes."""

    def __init__(self, stream=None, consume=True, echo=False):
        self.stream = stream
        self.data = bytearray()
        self.eof = False
        self.reset = None
        self.is_closed = False
        self.writable_calls = 0
        self.consume = consume
        self.echo = echo

    def data_received(self, data):
        self.data += data
        if self.echo:
            self.stream.write(bytes(data))
        if self.consume:
            self.stream.consume(len(data))

    def eof_received(self):
        self.eof = True
        if self.echo:
            self.stream.write_eof()

    def reset_received(self, code):
        self.reset = code

    def writable(self):
        self.writable_calls += 1

    def closed(self):
        self.is_closed = True


async def pair(certs, limits=None, server_limits=None, on_link=None, **kw):
    """A server and a connected client link; returns (server, client_link, server_link, server_recorder)."""
    limits = limits or Limits()
    links = []

    def accept(link):
        rec = Recorder()
        link.set_handler(rec)
        link.handshake_done()
        links.append((link, rec))

    server = await serve_quic("127.0.0.1", 0, cert_file=certs["cert"], key_file=certs["key"],
                              limits=server_limits or limits, on_link=on_link or accept)
    client = await connect_quic("127.0.0.1", server.port, ca_file=certs["ca"], server_name="localhost",
                                limits=limits, timeout=10)
    if on_link is None:
        await wait_for(lambda: links, what="server link")
        return server, client, links[0][0], links[0][1]
    return server, client, None, None


# --- tests -----------------------------------------------------------------------------

def test_control_both_ways(run, certs):
    async def main():
        server, client, slink, srec = await pair(certs)
        crec = Recorder()
        client.set_handler(crec)
        assert client.carrier == "quic" and client.session.version == 1
        client.send_control({"type": "auth", "token": "x"})
        await wait_for(lambda: srec.controls)
        assert srec.controls == [{"type": "auth", "token": "x"}]
        slink.send_control({"type": "registered", "agent_id": "a"})
        await wait_for(lambda: crec.controls)
        assert crec.controls == [{"type": "registered", "agent_id": "a"}]
        client.close(ErrorCode.NO_ERROR, "bye")
        await wait_for(lambda: srec.closed and crec.closed)
        assert srec.closed[0] == ErrorCode.NO_ERROR
        await client.wait_closed()
        server.close()
        await server.wait_closed()

    run(main())


def _pattern(seed: int, size: int) -> bytes:
    block = bytes((seed * 31 + i) & 0xFF for i in range(251))
    return (block * (size // 251 + 1))[:size]


def test_many_streams_exact_bytes_both_ways(run, certs):
    """The relay opens many streams; the agent echoes; both directions carry exact bytes."""

    async def main():
        server, client, slink, srec = await pair(certs)
        crec = Recorder(on_stream=lambda s: Collect(s, echo=True))
        client.set_handler(crec)
        handlers = []
        for i in range(40):
            h = Collect()
            s = slink.open_stream(f"res-{i}".encode(), h)
            h.stream = s
            payload = _pattern(i, 1000 + i * 1999)
            # Write in a few pieces, including a memoryview.
            s.write(payload[:500])
            s.write(memoryview(payload)[500:])
            s.write_eof()
            handlers.append((h, payload))
        await wait_for(lambda: all(h.eof for h, _ in handlers), what="echoes")
        for h, payload in handlers:
            assert bytes(h.data) == payload
        await wait_for(lambda: all(h.is_closed for h, _ in handlers), what="closed")
        assert sorted(s.metadata for s, _ in crec.streams) == sorted(f"res-{i}".encode() for i in range(40))
        await wait_for(lambda: slink.stream_count == 0 and client.stream_count == 0)
        assert slink.bytes_sent == client.bytes_received == sum(len(p) for _, p in handlers)
        client.close()
        server.close()

    run(main())


def test_half_close_both_ways(run, certs):
    async def main():
        server, client, slink, srec = await pair(certs)
        crec = Recorder()
        client.set_handler(crec)
        h = Collect()
        s = slink.open_stream(b"db", h)
        h.stream = s
        s.write(b"request")
        s.write_eof()
        await wait_for(lambda: crec.streams and crec.streams[0][1].eof)
        cs, ch = crec.streams[0]
        assert bytes(ch.data) == b"request"
        # The other direction keeps flowing after the FIN.
        cs.write(b"response part 1 ")
        cs.write(b"part 2")
        await wait_for(lambda: bytes(h.data) == b"response part 1 part 2")
        assert not h.eof and not h.is_closed
        cs.write_eof()
        await wait_for(lambda: h.eof and h.is_closed and ch.is_closed)
        assert h.reset is None and ch.reset is None

        # Agent-side half-close first this time.
        h2 = Collect()
        s2 = slink.open_stream(b"db", h2)
        h2.stream = s2
        await wait_for(lambda: len(crec.streams) == 2)
        cs2, ch2 = crec.streams[1]
        cs2.write(b"early")
        cs2.write_eof()
        await wait_for(lambda: h2.eof)
        s2.write(b"late")
        s2.write_eof()
        await wait_for(lambda: ch2.eof and h2.is_closed and ch2.is_closed)
        assert bytes(ch2.data) == b"late" and bytes(h2.data) == b"early"
        client.close()
        server.close()

    run(main())


def test_resets_carry_codes(run, certs):
    async def main():
        server, client, slink, srec = await pair(certs)
        crec = Recorder()
        client.set_handler(crec)
        # Relay resets.
        h = Collect()
        s = slink.open_stream(b"db", h)
        s.write(b"x" * 10000)
        await wait_for(lambda: crec.streams)
        s.reset(ErrorCode.CONNECTION_RESET)
        ch = crec.streams[0][1]
        await wait_for(lambda: ch.reset is not None and ch.is_closed)
        assert ch.reset == ErrorCode.CONNECTION_RESET and not ch.eof
        await wait_for(lambda: h.is_closed)
        assert h.reset is None  # a local reset is not reported back
        # Agent resets.
        h2 = Collect()
        s2 = slink.open_stream(b"db", h2)
        s2.write(b"hello")
        await wait_for(lambda: len(crec.streams) == 2)
        crec.streams[1][0].reset(ErrorCode.CONNECT_FAILED)
        await wait_for(lambda: h2.reset is not None and h2.is_closed)
        assert h2.reset == ErrorCode.CONNECT_FAILED
        # Refusal by returning None from stream_opened after reset.
        crec.on_stream = lambda st: st.reset(ErrorCode.REFUSED)
        h3 = Collect()
        slink.open_stream(b"nope", h3)
        await wait_for(lambda: h3.reset is not None)
        assert h3.reset == ErrorCode.REFUSED
        # The link is still fine.
        client.send_control({"type": "ping"})
        await wait_for(lambda: srec.controls)
        assert client.stream_count == 0
        client.close()
        server.close()

    run(main())


def test_wrong_ca_is_refused(run, certs):
    async def main():
        server = await serve_quic("127.0.0.1", 0, cert_file=certs["cert"], key_file=certs["key"], limits=Limits(),
                                  on_link=lambda link: pytest.fail("link accepted"))
        with pytest.raises(LinkError):
            await connect_quic("127.0.0.1", server.port, ca_file=certs["other_ca"], server_name="localhost",
                               limits=Limits(), timeout=5)
        # Wrong name is refused too.
        with pytest.raises(LinkError):
            await connect_quic("127.0.0.1", server.port, ca_file=certs["ca"], server_name="evil.example",
                               limits=Limits(), timeout=5)
        # The system store does not know our private CA.
        with pytest.raises(LinkError):
            await connect_quic("127.0.0.1", server.port, ca_file=None, server_name="localhost",
                               limits=Limits(), timeout=5)
        server.close()

    run(main())


SMALL = Limits(initial_stream_window=256 * KiB, session_window=4 * MiB, stream_send_high_water=128 * KiB,
               stream_send_low_water=32 * KiB)


def test_receiver_that_never_consumes_bounds_memory(run, certs):
    """A private service that never reads: the sender pauses and memory stays bounded."""

    async def main():
        server, client, slink, srec = await pair(certs, limits=SMALL)
        crec = Recorder(on_stream=lambda s: Collect(s, consume=False))
        client.set_handler(crec)
        h = Collect()
        s = slink.open_stream(b"db", h)
        h.stream = s
        chunk = b"z" * (64 * KiB)
        written = 0
        while not s.paused:  # write like a TCP source until told to stop
            s.write(chunk)
            written += len(chunk)
            await asyncio.sleep(0)
            assert written < 8 * MiB, "never paused"
        # Keep the loop running until the receiver holds a full window and nothing moves.
        await wait_for(lambda: crec.streams and len(crec.streams[0][1].data) >= SMALL.initial_stream_window - 4 * KiB,
                       what="receiver window filled")
        cs, ch = crec.streams[0]
        for _ in range(50):
            await asyncio.sleep(0)
        bound = SMALL.initial_stream_window + SMALL.stream_send_high_water + len(chunk) + 256 * KiB
        assert s.paused
        assert s.send_buffered <= bound, (s.send_buffered, bound)
        assert len(ch.data) <= SMALL.initial_stream_window
        # Consuming lets the rest through and the sender resumes.
        total = written
        cs.handler.consume = True
        cs.consume(len(ch.data))
        await wait_for(lambda: h.writable_calls >= 1, what="writable")
        s.write_eof()
        await wait_for(lambda: ch.eof, what="all data")
        assert len(ch.data) == total
        client.close()
        server.close()

    run(main())


def test_client_that_stops_reading_bounds_memory(run, certs):
    """The agent side sends towards a relay client that stopped reading (never consumes)."""

    async def main():
        server, client, slink, srec = await pair(certs, limits=SMALL)
        senders = []

        def on_stream(st):
            senders.append(st)
            return Collect(st)

        crec = Recorder(on_stream=on_stream)
        client.set_handler(crec)
        h = Collect(consume=False)
        s = slink.open_stream(b"db", h)
        h.stream = s
        await wait_for(lambda: senders)
        cs = senders[0]
        chunk = b"y" * (32 * KiB)
        while not cs.paused:
            cs.write(chunk)
            await asyncio.sleep(0)
        await wait_for(lambda: len(h.data) >= SMALL.initial_stream_window - 4 * KiB, what="window filled")
        for _ in range(50):
            await asyncio.sleep(0)
        assert cs.paused
        assert cs.send_buffered <= SMALL.initial_stream_window + SMALL.stream_send_high_water + len(chunk) + 256 * KiB
        assert len(h.data) <= SMALL.initial_stream_window
        client.close()
        server.close()

    run(main())


def test_stalled_stream_does_not_block_another(run, certs):
    async def main():
        server, client, slink, srec = await pair(certs, limits=SMALL)
        crec = Recorder(on_stream=lambda s: Collect(s, consume=s.metadata != b"stalled"))
        client.set_handler(crec)
        stalled = slink.open_stream(b"stalled", Collect())
        while not stalled.paused:
            stalled.write(b"s" * (64 * KiB))
            await asyncio.sleep(0)
        h = Collect()
        other = slink.open_stream(b"busy", h)
        h.stream = other
        size = 8 * MiB  # far beyond one stream window
        payload = _pattern(3, size)
        view = memoryview(payload)
        pos = 0
        resumed = asyncio.Event()
        h.writable = resumed.set
        while pos < size:
            other.write(view[pos:pos + 64 * KiB])
            pos += 64 * KiB
            if other.paused:
                resumed.clear()
                await asyncio.wait_for(resumed.wait(), 60)
        other.write_eof()
        await wait_for(lambda: any(s.metadata == b"busy" and hh.eof for s, hh in crec.streams), what="busy done")
        busy = next(hh for s, hh in crec.streams if s.metadata == b"busy")
        assert bytes(busy.data) == payload
        assert stalled.paused
        client.close()
        server.close()

    run(main())


def test_handshake_deadline_cuts_unauthenticated_link(run, certs):
    async def main():
        limits = Limits(handshake_timeout=0.5, keepalive_interval=5, keepalive_timeout=15)
        accepted = []

        def on_link(link):
            link.set_handler(Recorder())
            accepted.append(link)  # never calls handshake_done

        server = await serve_quic("127.0.0.1", 0, cert_file=certs["cert"], key_file=certs["key"], limits=limits,
                                  on_link=on_link)
        client = await connect_quic("127.0.0.1", server.port, ca_file=certs["ca"], server_name="localhost",
                                    limits=limits, timeout=10)
        crec = Recorder()
        client.set_handler(crec)
        await wait_for(lambda: accepted)
        assert server.pending_handshakes == 1
        await wait_for(lambda: crec.closed is not None, timeout=10, what="client told")
        assert crec.closed[0] == ErrorCode.TIMEOUT
        await wait_for(lambda: server.pending_handshakes == 0 and server.connection_count == 0)
        server.close()

    run(main())


def test_pending_handshake_cap(run, certs):
    async def main():
        limits = Limits(max_pending_handshakes=1, handshake_timeout=30)
        server = await serve_quic("127.0.0.1", 0, cert_file=certs["cert"], key_file=certs["key"], limits=limits,
                                  on_link=lambda link: link.set_handler(Recorder()))
        first = await connect_quic("127.0.0.1", server.port, ca_file=certs["ca"], server_name="localhost",
                                   limits=limits, timeout=10)
        with pytest.raises(LinkError):
            await connect_quic("127.0.0.1", server.port, ca_file=certs["ca"], server_name="localhost",
                               limits=limits, timeout=10)
        assert server.refused == 1
        first.close()
        await wait_for(lambda: server.pending_handshakes == 0)
        server.close()

    run(main())


def test_initial_flood_gets_retries_and_holds_at_most_half_the_slots(run, certs):
    """Initials from addresses that never answer (spoofed) cannot fill the handshake slots."""
    async def main():
        limits = Limits(max_pending_handshakes=16, handshake_timeout=30)
        server, client, _, _ = await pair(certs, limits=limits)
        client.close()
        await wait_for(lambda: server.pending_handshakes == 0, what="first client authenticated")
        flood = await idle_quic_clients("127.0.0.1", server.port, 100, answer=False)
        try:
            await wait_for(lambda: server.pending_handshakes + server.retries >= 100, what="flood handled")
            assert server.pending_handshakes == 8 and server.retries == 92
            links = []
            server._on_link = lambda link: (link.set_handler(Recorder()), link.handshake_done(), links.append(link))
            real = await connect_quic("127.0.0.1", server.port, ca_file=certs["ca"], server_name="localhost",
                                      limits=limits, timeout=10)
            await wait_for(lambda: links, what="real client accepted after a Retry")
            assert server.retries == 93 and server.evicted == 0
            real.close()
        finally:
            for c in flood:
                c.close()
        server.close()

    run(main())


def test_idle_handshakes_are_evicted_for_a_real_client(run, certs):
    """Address-validated clients that finish the QUIC handshake and then say nothing hold every
    slot; once they are stale, a real client still gets in (the oldest idle one is evicted)."""
    async def main():
        limits = Limits(max_pending_handshakes=16, handshake_timeout=30)
        links = []

        def accept(link):
            link.set_handler(Recorder())
            link.handshake_done()
            links.append(link)

        server = await serve_quic("127.0.0.1", 0, cert_file=certs["cert"], key_file=certs["key"], limits=limits,
                                  on_link=accept)
        flood = await idle_quic_clients("127.0.0.1", server.port, 40, answer=True)
        try:
            await wait_for(lambda: server.pending_handshakes == 16 and server.refused == 24, what="slots full")
            full_at = asyncio.get_running_loop().time()
            await wait_for(lambda: asyncio.get_running_loop().time() - full_at > 1.1, what="idle handshakes stale")
            assert not links
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            real = await connect_quic("127.0.0.1", server.port, ca_file=certs["ca"], server_name="localhost",
                                      limits=limits, timeout=10)
            await wait_for(lambda: links, what="real client accepted")
            assert loop.time() - t0 < 2.0
            assert server.evicted == 1 and server.pending_handshakes == 15
            real.close()
        finally:
            for c in flood:
                c.close()
        server.close()

    run(main())


def test_keepalive_detects_dead_peer(run, certs):
    async def main():
        limits = Limits(keepalive_interval=0.2, keepalive_timeout=0.8)
        server, client, slink, srec = await pair(certs, limits=limits)
        crec = Recorder()
        client.set_handler(crec)
        # Quiet for several intervals: keepalives keep the link up.
        loop = asyncio.get_running_loop()
        start = loop.time()
        await wait_for(lambda: loop.time() - start > 1.5, what="quiet period")
        assert crec.closed is None and srec.closed is None
        # The relay vanishes without a word.
        server._transport.abort() if hasattr(server._transport, "abort") else server._transport.close()
        t0 = loop.time()
        await wait_for(lambda: crec.closed is not None, timeout=10, what="dead relay noticed")
        assert loop.time() - t0 < limits.keepalive_timeout + 1.0
        assert crec.closed[0] == ErrorCode.TIMEOUT
        await client.wait_closed()

    run(main())


# --- datagram size from the path ---------------------------------------------------------

async def _one_way(src_link, dst_rec, size: int, name: bytes = b"bulk"):
    """Send ``size`` patterned bytes from ``src_link`` on a new stream; return the receiver's handler."""
    h = Collect()
    stream = src_link.open_stream(name, h)
    h.stream = stream
    payload = _pattern(7, size)
    resumed = asyncio.Event()
    h.writable = resumed.set
    view = memoryview(payload)
    for pos in range(0, size, 64 * KiB):
        stream.write(view[pos:pos + 64 * KiB])
        if stream.paused:
            resumed.clear()
            await asyncio.wait_for(resumed.wait(), 60)
    stream.write_eof()
    await wait_for(lambda: any(s.metadata == name and hh.eof for s, hh in dst_rec.streams), what="all bytes")
    got = next(hh for s, hh in dst_rec.streams if s.metadata == name)
    assert bytes(got.data) == payload
    return got


def test_datagram_size_follows_the_route(run, certs):
    """Loopback carries more than a standard path: both ends use the largest datagram
    aioquic fills; ``quic_max_datagram_size`` wins when set."""

    async def main(expected, limits):
        server, client, slink, srec = await pair(certs, limits)
        client.set_handler(Recorder())
        assert client.datagram_size == expected and slink.datagram_size == expected
        await _one_way(client, srec, 2 * MiB)
        client.close()
        server.close()

    run(main(MAX_PATH_DATAGRAM_SIZE, Limits()))
    run(main(4000, Limits().replace(quic_max_datagram_size=4000)))


# --- limits shared with the WSS session ----------------------------------------------------

class Ordered(Recorder):
    """A Recorder that also keeps the order of control messages and the close."""

    def __init__(self):
        super().__init__()
        self.log = []

    def control_received(self, message):
        self.log.append(("control", message.get("type")))
        super().control_received(message)

    def link_closed(self, code, reason):
        self.log.append(("closed", code))
        super().link_closed(code, reason)


def test_control_message_reaches_peer_before_close(run, certs):
    """send_control then close: the message arrives, then the close with its code."""

    async def main():
        for _ in range(3):
            server, client, slink, srec = await pair(certs)
            crec = Ordered()
            client.set_handler(crec)
            detail = "x" * (40 * KiB)  # spans many packets
            slink.send_control({"type": "error", "code": "unauthorized", "message": detail})
            slink.close(ErrorCode.UNAUTHORIZED, "registration refused")
            await wait_for(lambda: crec.closed is not None, what="client told")
            assert crec.log == [("control", "error"), ("closed", ErrorCode.UNAUTHORIZED)]
            assert crec.controls[0]["message"] == detail
            await slink.wait_closed()
            server.close()

    run(main())


def test_peer_streams_beyond_the_limit_are_reset(run, certs, client_engine):
    async def main():
        limits = Limits(max_concurrent_streams=3)
        server, client, slink, srec = await pair(certs, limits=limits, server_limits=Limits())
        crec = Recorder()
        client.set_handler(crec)
        # aioquic's own MAX_STREAMS lets a few more through, so that ours answers them (qh3's
        # is 100, fixed).
        if client_engine == "aioquic":
            assert client._pipe.session.connection._local_max_streams_bidi.value > limits.max_concurrent_streams
        handlers = []
        for i in range(5):
            h = Collect()
            s = slink.open_stream(f"s{i}".encode(), h)
            s.write(b"hello")
            handlers.append(h)
        await wait_for(lambda: sum(h.reset is not None for h in handlers) == 2 and len(crec.streams) == 3,
                       what="two refused")
        assert [h.reset for h in handlers[3:]] == [ErrorCode.STREAM_LIMIT] * 2
        assert all(h.reset is None for h in handlers[:3])
        # Once one finishes, a new stream is accepted again.
        crec.streams[0][0].reset(ErrorCode.NO_ERROR)
        await wait_for(lambda: client.stream_count == 2)
        h = Collect()
        slink.open_stream(b"again", h).write(b"x")
        await wait_for(lambda: len(crec.streams) == 4, what="accepted again")
        assert h.reset is None
        client.close()
        server.close()

    run(main())


def test_streams_beyond_the_engines_limit_wait_for_one_to_end(run, certs, client_engine):
    """The relay opens more streams than a qh3 agent takes at once (100, fixed by qh3): the
    others wait (queued by the relay's aioquic), and get in, exact, as the first ones end. An
    aioquic agent takes them all at once (up to MAX_CONCURRENT_STREAMS)."""

    async def main():
        server, client, slink, srec = await pair(certs)
        crec = Recorder(on_stream=lambda s: Collect(s, echo=True))
        client.set_handler(crec)
        handlers = []
        for i in range(120):
            h = Collect()
            s = slink.open_stream(f"s{i}".encode(), h)
            h.stream = s
            s.write(b"hello %d" % i)
            handlers.append((s, h))
        at_once = 100 if client_engine == "qh3" else 120
        await wait_for(lambda: sum(len(h.data) > 0 for _, h in handlers) == at_once, what="first echoes")
        for _ in range(50):
            await asyncio.sleep(0)
        assert len(crec.streams) == at_once
        for s, _ in handlers:
            s.write_eof()
        await wait_for(lambda: all(h.eof for _, h in handlers), what="every stream served")
        assert [bytes(h.data) for _, h in handlers] == [b"hello %d" % i for i in range(120)]
        assert all(h.reset is None for _, h in handlers)
        client.close()
        server.close()

    run(main())


def test_ping_flood_closes_with_enhance_your_calm(run, certs):
    async def main():
        server, client, slink, srec = await pair(certs, server_limits=Limits(max_ping_rate=5))
        crec = Recorder()
        client.set_handler(crec)
        for i in range(20):  # past our own checks, straight onto the control stream
            client._pipe.write([frames.encode_frame(FrameType.PING, 0, 0, i.to_bytes(8, "big"))])
        await wait_for(lambda: crec.closed is not None and srec.closed is not None, what="closed")
        assert srec.closed[0] == ErrorCode.ENHANCE_YOUR_CALM
        assert crec.closed[0] == ErrorCode.ENHANCE_YOUR_CALM
        server.close()

    run(main())


def test_stream_churn_closes_with_enhance_your_calm(run, certs):
    async def main():
        server, client, slink, srec = await pair(certs, limits=Limits(max_stream_churn_rate=10),
                                                 server_limits=Limits())
        crec = Recorder()
        client.set_handler(crec)
        for i in range(30):
            s = slink.open_stream(b"churn", Collect())
            s.write(b"x")
            s.reset(ErrorCode.NO_ERROR)
        await wait_for(lambda: crec.closed is not None and srec.closed is not None, what="closed")
        assert crec.closed[0] == ErrorCode.ENHANCE_YOUR_CALM
        assert srec.closed[0] == ErrorCode.ENHANCE_YOUR_CALM
        server.close()

    run(main())


def test_half_closed_stream_without_progress_times_out(run, certs):
    async def main():
        limits = Limits(half_close_timeout=1.0)
        server, client, slink, srec = await pair(certs, limits=limits)
        crec = Recorder()
        client.set_handler(crec)
        # A stream that makes progress while half-closed stays up.
        busy = Collect()
        bs = slink.open_stream(b"busy", busy)
        busy.stream = bs
        bs.write_eof()
        await wait_for(lambda: crec.streams, what="busy stream")
        cbs = crec.streams[0][0]
        loop = asyncio.get_running_loop()
        start = loop.time()
        while loop.time() - start < 2.5 * limits.half_close_timeout:
            cbs.write(b"tick")
            await asyncio.sleep(0.05)  # the traffic's pace, not a wait for state
        cbs.write_eof()
        await wait_for(lambda: busy.eof and busy.is_closed, what="busy stream done")
        assert busy.reset is None and busy.data.startswith(b"tick")
        # A stream half-closed by the relay that the agent never answers is reset with TIMEOUT.
        h = Collect()
        s = slink.open_stream(b"idle", h)
        s.write(b"request")
        s.write_eof()
        await wait_for(lambda: len(crec.streams) == 2 and crec.streams[1][1].eof, what="request")
        ch = crec.streams[1][1]
        await wait_for(lambda: h.reset is not None and ch.reset is not None, what="timeouts")
        assert h.reset == ErrorCode.TIMEOUT and ch.reset == ErrorCode.TIMEOUT
        await wait_for(lambda: slink.stream_count == 0 and client.stream_count == 0)
        assert crec.closed is None  # the link itself is fine
        client.close()
        server.close()

    run(main())


def test_memory_handed_to_aioquic_is_bounded_per_link(run, certs):
    """Many streams towards a receiver that consumes nothing: what the link hands aioquic
    stays within the peer's receive bound (the core's credit), the rest waits in our queues."""

    async def main():
        server, client, slink, srec = await pair(certs, limits=SMALL)
        crec = Recorder(on_stream=lambda s: Collect(s, consume=False))
        client.set_handler(crec)
        streams = []
        for i in range(40):
            s = slink.open_stream(f"s{i}".encode(), Collect())
            streams.append(s)
        for _ in range(8):
            for s in streams:
                if not s.paused:
                    s.write(b"m" * (64 * KiB))
            await asyncio.sleep(0)

        def received():
            return sum(len(h.data) for _, h in crec.streams)

        await wait_for(lambda: received() >= SMALL.session_window - 64 * KiB, what="session window filled")
        for _ in range(50):
            await asyncio.sleep(0)
        handed = sum(route.sent for route in slink._pipe.session._routes.values())
        assert handed >= SMALL.session_window - 64 * KiB  # the measure sees what is there
        assert handed <= SMALL.receive_bound, handed
        assert received() <= SMALL.receive_bound
        client.close()
        server.close()

    run(main())


def test_link_wide_send_queue_pauses_every_writer(run, certs):
    """session_send_high_water bounds our own queues across a link, as on WSS: above it every
    writer is paused, even one whose own queue is short; all resume once it drains."""

    async def main():
        limits = SMALL.replace(session_send_high_water=256 * KiB)
        server, client, slink, srec = await pair(certs, limits=limits)
        consuming = []  # empty: the receiver does not consume (yet)
        crec = Recorder(on_stream=lambda s: Collect(s, consume=bool(consuming)))
        client.set_handler(crec)
        chunk = b"q" * (64 * KiB)
        streams, handlers = [], []
        for i in range(4):
            h = Collect()
            s = slink.open_stream(f"s{i}".encode(), h)
            streams.append(s)
            handlers.append(h)
        written = [0] * 4
        while not all(s.paused for s in streams):
            for i, s in enumerate(streams):
                if not s.paused:
                    s.write(chunk)
                    written[i] += len(chunk)
            await asyncio.sleep(0)
            assert sum(written) < 32 * MiB, "never paused"
        for _ in range(50):
            await asyncio.sleep(0)
        queued = sum(s.send_buffered for s in streams)
        assert queued <= limits.session_send_high_water + 4 * len(chunk), queued
        assert any(s.send_buffered <= limits.stream_send_high_water for s in streams)  # paused by the link
        # The receiver starts consuming (streams whose OPEN arrives later too): every writer is
        # told to go on, every byte arrives.
        consuming.append(True)
        for cs, ch in crec.streams:
            ch.consume = True
            cs.consume(len(ch.data))
        await wait_for(lambda: all(h.writable_calls for h in handlers), what="all writable")
        for s in streams:
            s.write_eof()
        await wait_for(lambda: len(crec.streams) == 4 and all(ch.eof for _, ch in crec.streams), what="all data")
        assert sorted(len(ch.data) for _, ch in crec.streams) == sorted(written)
        client.close()
        server.close()

    run(main())
