"""Two sessions wired together in memory: random data on many streams, random splits, random
consumer pacing; plus fuzzing a session with arbitrary bytes after a valid HELLO."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunnel import codec as frames
from tunnel.core.events import (
    ConnectionClosed,
    DataReceived,
    PingAcknowledged,
    SessionReady,
    StreamClosed,
    StreamEnded,
    StreamOpened,
    StreamReset,
    StreamWritable,
)
from tunnel.core.limits import DEFAULT_LIMITS
from tunnel.core.session import Session
from tunnel.core.session_state import Role
from tunnel.wire.constants import ErrorCode, FrameType

KiB = 1024

TIGHT = DEFAULT_LIMITS.replace(
    max_frame_size=16 * KiB, initial_stream_window=24 * KiB, session_window=80 * KiB,
    send_quantum=5 * KiB, stream_send_high_water=32 * KiB, stream_send_low_water=8 * KiB,
    session_send_high_water=96 * KiB)


class App:
    """One side's application: writes its payloads (honouring paused), consumes at random.
    With ``receivers`` it takes stream data through ``Session.set_receiver`` and
    ``pop_received`` instead of ``DataReceived`` events."""

    def __init__(self, session: Session, rng: random.Random, limits, receivers: bool = False) -> None:
        self.s = session
        self.rng = rng
        self.limits = limits
        self.receivers = receivers
        self.outgoing: dict[int, bytearray] = {}  # stream -> bytes still to write
        self.received: dict[int, bytearray] = {}
        self.unconsumed: dict[int, int] = {}
        self.ended: set[int] = set()
        self.closed: set[int] = set()
        self.eof_sent: set[int] = set()
        self.writable_events = 0

    def opened(self, sid: int) -> None:
        self.received[sid] = bytearray()
        self.unconsumed[sid] = 0
        if self.receivers:
            self.s.set_receiver(sid, sid)

    def data(self, sid: int, data) -> None:
        assert sid not in self.ended
        self.received[sid] += data
        self.unconsumed[sid] += len(data)
        # Memory bound: never more unconsumed than the window we granted (it may grow
        # with the path up to max_stream_window).
        assert self.unconsumed[sid] <= min(self.limits.max_stream_window, self.limits.session_window)

    def handle(self, received, events, payload_for) -> None:
        for sid, payloads in received:  # before the events, as Session.pop_received says
            for data in payloads:
                self.data(sid, data)
        for e in events:
            if isinstance(e, StreamOpened):
                self.opened(e.stream_id)
                self.outgoing[e.stream_id] = bytearray(payload_for(e.stream_id, e.metadata))
            elif isinstance(e, DataReceived):
                self.data(e.stream_id, e.data)
            elif isinstance(e, StreamEnded):
                self.ended.add(e.stream_id)
            elif isinstance(e, StreamClosed):
                self.closed.add(e.stream_id)
            elif isinstance(e, StreamWritable):
                self.writable_events += 1
            elif isinstance(e, (StreamReset, ConnectionClosed)):
                raise AssertionError(f"unexpected {e}")
        assert self.s.received_unconsumed <= self.limits.session_window

    def step(self) -> None:
        rng = self.rng
        for sid, data in self.outgoing.items():
            if sid in self.eof_sent:
                continue
            if data:
                if self.s.stream_paused(sid):
                    continue
                n = rng.randint(1, min(len(data), 20 * KiB))
                chunk = bytes(data[:n])
                del data[:n]
                fin = not data and rng.random() < 0.5
                self.s.send_data(sid, chunk, end_stream=fin)
                if fin:
                    self.eof_sent.add(sid)
            elif rng.random() < 0.7:
                self.s.end_stream(sid)
                self.eof_sent.add(sid)
        for sid, n in list(self.unconsumed.items()):
            if n and rng.random() < 0.6:
                k = rng.randint(1, n)
                self.s.consume(sid, k)
                self.unconsumed[sid] -= k


def pump(src: Session, dst: Session, rng: random.Random, now: float, received: list | None = None) -> int:
    """Move what ``src`` sends to ``dst`` in random pieces; what ``dst`` collects for stream
    receivers goes to ``received``."""
    bufs = src.data_to_send(rng.choice([None, 1, 100, 4 * KiB, 64 * KiB]))
    data = b"".join(bytes(b) for b in bufs)
    pos = 0
    while pos < len(data):
        n = rng.choice([1, 7, 12, 100, 5000, len(data)])
        dst.receive_data(data[pos:pos + n], now)
        if received is not None:
            received.extend(dst.pop_received())
        pos += n
    return len(data)


def run_pair(seed: int, nstreams: int, max_size: int, limits=TIGHT, receivers: bool | None = None) -> None:
    rng = random.Random(seed)
    agent = Session(Role.AGENT, limits)
    relay = Session(Role.RELAY, limits)
    # Each side takes its data as events or through stream receivers (as the seed says, unless
    # ``receivers`` is given).
    a_app = App(agent, rng, limits, receivers=rng.random() < 0.5 if receivers is None else receivers)
    r_app = App(relay, rng, limits, receivers=rng.random() < 0.5 if receivers is None else receivers)
    up: dict[int, bytes] = {}
    down: dict[int, bytes] = {}

    def make_payload(sid, meta):
        data = rng.randbytes(rng.randint(0, max_size))
        down[sid] = data
        return data

    now = 0.0
    pump(agent, relay, rng, now)
    pump(relay, agent, rng, now)
    assert agent.pop_events() == [SessionReady(1)] and relay.pop_events() == [SessionReady(1)]
    for _ in range(nstreams):
        sid = agent.open_stream(b"res")
        data = rng.randbytes(rng.randint(0, max_size))
        up[sid] = data
        a_app.outgoing[sid] = bytearray(data)
        a_app.opened(sid)
    idle = 0
    for _ in range(100_000):
        now += 0.001
        a_app.step()
        r_app.step()
        to_agent: list = []
        to_relay: list = []
        moved = pump(agent, relay, rng, now, to_relay) + pump(relay, agent, rng, now, to_agent)
        a_app.handle(to_agent, agent.pop_events(), None)
        r_app.handle(to_relay, relay.pop_events(), make_payload)
        if len(a_app.closed) == nstreams and len(r_app.closed) == nstreams:
            break
        consumed_all = not any(a_app.unconsumed.values()) and not any(r_app.unconsumed.values())
        idle = idle + 1 if (not moved and consumed_all) else 0
        assert idle < 50, "deadlock: nothing moves"
    else:
        raise AssertionError("did not finish")
    # Drain the last consumes and WINDOW_UPDATEs.
    for app in (a_app, r_app):
        for sid, n in app.unconsumed.items():
            app.s.consume(sid, n)
    pump(agent, relay, rng, now)
    pump(relay, agent, rng, now)
    for sid, data in up.items():
        assert bytes(r_app.received[sid]) == data
        assert bytes(a_app.received[sid]) == down[sid]
    assert a_app.ended == set(up) and r_app.ended == set(up)
    for s in (agent, relay):
        assert s.open_stream_count == 0 and not s.closed
        assert s.send_buffered_total == 0 and s.received_unconsumed == 0
        assert not s._streams and not s._active and not s._send.paused and not s._policy._half_closed
        assert [e for e in s.pop_events() if not isinstance(e, PingAcknowledged)] == []
    assert agent.bytes_sent == relay.bytes_received == sum(map(len, up.values()))
    assert relay.bytes_sent == agent.bytes_received == sum(map(len, down.values()))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), nstreams=st.integers(1, 6), max_size=st.sampled_from([0, 100, 30_000, 120_000]))
def test_pair_random(seed, nstreams, max_size):
    run_pair(seed, nstreams, max_size)


def test_pair_many_streams_seeded():
    run_pair(1234, 40, 60_000, receivers=False)


def test_pair_many_streams_with_stream_receivers():
    run_pair(1234, 40, 60_000, receivers=True)


def test_pair_default_limits_bulk():
    run_pair(99, 3, 3_000_000, DEFAULT_LIMITS)


def test_fairness_two_streams_share_the_link():
    # Windows large enough that only the scheduler decides who sends.
    roomy = TIGHT.replace(initial_stream_window=1 << 20, session_window=4 << 20)
    agent = Session(Role.AGENT, roomy)
    relay = Session(Role.RELAY, roomy)
    rng = random.Random(5)
    pump(agent, relay, rng, 0)
    pump(relay, agent, rng, 0)
    relay.pop_events()
    a, b = agent.open_stream(), agent.open_stream()
    agent.send_data(a, b"a" * 200 * KiB)
    agent.send_data(b, b"b" * 200 * KiB)
    got = {a: 0, b: 0}
    for _ in range(20):
        relay.receive_data(b"".join(bytes(x) for x in agent.data_to_send(16 * KiB)), 0)
        for e in relay.pop_events():
            if isinstance(e, DataReceived):
                got[e.stream_id] += len(e.data)
                relay.consume(e.stream_id, len(e.data))
        agent.receive_data(b"".join(bytes(x) for x in relay.data_to_send()), 0)
        assert abs(got[a] - got[b]) <= roomy.send_quantum
    assert got[a] + got[b] >= 20 * 15 * KiB


# --- fuzz -----------------------------------------------------------------------------------

def _ready_session() -> Session:
    s = Session(Role.RELAY, TIGHT)
    s.receive_data(frames.encode_frame(FrameType.HELLO, 0, 0, frames.encode_hello(1, 1, 64 * KiB, 1 << 20, 16 * KiB, 10)), 0)
    s.pop_events()
    s.data_to_send()
    return s


def _check_no_internal_error(s: Session) -> None:
    for e in s.pop_events():
        if isinstance(e, ConnectionClosed):
            assert e.code != ErrorCode.INTERNAL_ERROR or e.remote, e


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(1, 50))
def test_fuzz_any_bytes_after_hello(data, step):
    s = _ready_session()
    for i in range(0, len(data), step):
        s.receive_data(data[i:i + step], i * 0.01)
        s.data_to_send()
    _check_no_internal_error(s)


_frame = st.builds(
    lambda t, f, sid, payload: frames.encode_frame(t, f, sid, payload),
    st.integers(0, 7), st.sampled_from([0, 0, 0, 1, 2]), st.sampled_from([0, 1, 2, 3, 5, 7, 1 << 31]),
    st.one_of(st.binary(max_size=40), st.sampled_from([b"\x00\x00\x00\x05", b"\x00\x00\x10\x00",
                                                       b"{}", b'{"type":"x"}', b"\x00" * 8])),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_frame, max_size=30), st.lists(st.integers(0, 3), max_size=30))
def test_fuzz_frame_sequences(frame_list, actions):
    s = _ready_session()
    for i, f in enumerate(frame_list):
        s.receive_data(f, i * 0.3)
        action = actions[i] if i < len(actions) else 0
        for sid in s.stream_ids():
            if action == 1:
                s.consume(sid, 1000)
            elif action == 2:
                try:
                    s.send_data(sid, b"x" * 3000)
                except Exception:
                    pass
            elif action == 3:
                s.reset_stream(sid)
        s.handle_timer(i * 0.3)
        s.data_to_send()
    _check_no_internal_error(s)
    assert s.received_unconsumed <= TIGHT.session_window
