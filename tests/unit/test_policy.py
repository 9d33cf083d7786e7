"""The link policy (tunnel/core/policy.py) with fake time: the rules both carriers obey.

The session (WSS) and the QUIC link call these same objects, so these cases are the QUIC
carrier's limits as much as the session's; tests/unit/test_session.py checks the session
applies them, tests/contract checks both carriers end to end.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel import codec as frames
from tunnel.core.events import DataReceived
from tunnel.core.limits import DEFAULT_LIMITS, Limits
from tunnel.core.policy import (
    KEEPALIVE_PING,
    KEEPALIVE_TIMEOUT,
    LinkPolicy,
    SendWatermarks,
    MAX_REPLY_BACKLOG,
    accept_hello,
    check_reply_backlog,
    hello_payload,
    overdraft_credit,
    session_credit,
    stream_credit,
    tuned_window,
)
from tunnel.core.session import Session
from tunnel.core.session_state import Role
from tunnel.wire.constants import ErrorCode, Flags, FrameType
from tunnel.wire.control import encode_control
from tunnel.wire.errors import FloodError, ProtocolError, VersionMismatch


class S:
    """A stream as the policy sees one."""

    def __init__(self) -> None:
        self.buffered = 0
        self.paused = False
        self.last_activity = 0.0


def test_hello_round_trip_and_checks():
    peer = accept_hello(hello_payload(DEFAULT_LIMITS))
    assert peer.version == 1 and peer.stream_window == DEFAULT_LIMITS.initial_stream_window
    assert peer.max_frame_size == DEFAULT_LIMITS.max_frame_size
    with pytest.raises(VersionMismatch):
        accept_hello(frames.encode_hello(2, 3, 1000, 1000, 16384, 1))
    with pytest.raises(ProtocolError, match="max frame size"):
        accept_hello(frames.encode_hello(1, 1, 1000, 1000, 100, 1))
    with pytest.raises(ProtocolError, match="window"):
        accept_hello(frames.encode_hello(1, 1, 0, 1000, 16384, 1))
    with pytest.raises(ProtocolError):
        accept_hello(b"\x01")


def test_keepalive_ping_then_timeout():
    p = LinkPolicy(DEFAULT_LIMITS.replace(keepalive_interval=5, keepalive_timeout=15), now=100.0)
    assert p.next_deadline() == 105.0
    assert p.keepalive_due(104.9) is None
    assert p.keepalive_due(105.0) == KEEPALIVE_PING
    assert p.keepalive_due(106.0) is None  # one PING per interval of silence
    assert p.next_deadline() == 110.0
    p.last_received = 107.0  # the peer spoke
    assert p.next_deadline() == 112.0
    assert p.keepalive_due(112.0) == KEEPALIVE_PING
    assert p.keepalive_due(121.9) == KEEPALIVE_PING
    assert p.keepalive_due(122.0) == KEEPALIVE_TIMEOUT


def test_ping_round_trip_and_flood():
    p = LinkPolicy(DEFAULT_LIMITS.replace(max_ping_rate=3), now=0.0)
    payload = p.new_ping(1.0)
    assert p.ping_acked(b"unknown!", 1.1) is None and p.rtt is None
    assert p.ping_acked(payload, 1.25) == pytest.approx(0.25) and p.rtt == pytest.approx(0.25)
    assert p.ping_acked(payload, 1.5) is None  # answered once
    for i in range(3):
        p.ping_received(10.0 + i * 0.1)
    with pytest.raises(FloodError):
        p.ping_received(10.5)
    p2 = LinkPolicy(DEFAULT_LIMITS.replace(max_ping_rate=3), now=0.0)
    for i in range(30):
        p2.ping_received(i * 0.4)  # spread out: fine


def test_control_frames_are_judged_once():
    """What a PING, CONTROL or GOAWAY frame means, as both carriers apply it."""
    p = LinkPolicy(DEFAULT_LIMITS.replace(max_ping_rate=2, max_control_rate=1), 0.0)
    assert p.ping_frame(0, b"abcdefgh", 1.0) == (b"abcdefgh", None)  # answer it
    ours = p.new_ping(2.0)
    assert p.ping_frame(int(Flags.ACK), ours, 2.25) == (None, 0.25) and p.rtt == 0.25
    assert p.ping_frame(int(Flags.ACK), b"zzzzzzzz", 2.5) == (None, None)  # answers nothing of ours
    for bad in (b"", b"short", b"123456789"):
        with pytest.raises(ProtocolError):
            p.ping_frame(0, bad, 3.0)
    p.ping_frame(0, b"abcdefgh", 4.0)
    p.ping_frame(0, b"abcdefgh", 4.1)
    with pytest.raises(FloodError):
        p.ping_frame(0, b"abcdefgh", 4.2)
    assert p.control_frame(encode_control({"type": "x"}, 1024), 5.0) == {"type": "x"}
    with pytest.raises(FloodError):
        p.control_frame(encode_control({"type": "x"}, 1024), 5.1)
    with pytest.raises(ProtocolError):
        LinkPolicy(DEFAULT_LIMITS, 0.0).control_frame(b"{not json", 1.0)
    assert p.goaway_frame(frames.encode_goaway(7, 0, "drain")) == (7, 0, "drain", False)
    assert p.going_away
    assert p.goaway_frame(frames.encode_goaway(7, int(ErrorCode.PROTOCOL_ERROR), "bad"))[3] is True


def test_reply_backlog_is_bounded():
    check_reply_backlog(MAX_REPLY_BACKLOG)
    with pytest.raises(FloodError):
        check_reply_backlog(MAX_REPLY_BACKLOG + 1)


def test_outstanding_pings_are_bounded():
    p = LinkPolicy(DEFAULT_LIMITS, now=0.0)
    first = p.new_ping(0.0)
    for i in range(100):
        p.new_ping(float(i))
    assert p.ping_acked(first, 200.0) is None  # forgotten, not kept forever


def test_churn_and_control_floods():
    p = LinkPolicy(DEFAULT_LIMITS.replace(max_stream_churn_rate=5, max_control_rate=2), now=0.0)
    for _ in range(5):
        p.count_churn(1.0)
    with pytest.raises(FloodError):
        p.count_churn(1.5)
    p.control_received(3.0)
    p.control_received(3.1)
    with pytest.raises(FloodError):
        p.control_received(3.2)
    p.control_received(4.2)  # a new second


def test_peer_stream_admission():
    p = LinkPolicy(DEFAULT_LIMITS.replace(max_concurrent_streams=2), now=0.0)
    assert p.admit_peer_stream() is None and p.admit_peer_stream() is None
    assert p.admit_peer_stream() == ErrorCode.STREAM_LIMIT
    p.peer_stream_closed()
    assert p.admit_peer_stream() is None
    assert p.send_goaway(ErrorCode.NO_ERROR)
    assert not p.send_goaway(ErrorCode.NO_ERROR)  # one GOAWAY per code
    p.peer_stream_closed()
    assert p.admit_peer_stream() == ErrorCode.REFUSED  # going away


def test_going_away_and_drained():
    p = LinkPolicy(DEFAULT_LIMITS, now=0.0)
    assert not p.going_away and not p.drained(0)
    assert not p.goaway_from_peer(ErrorCode.NO_ERROR)  # drain, not close
    assert p.going_away and not p.drained(1) and p.drained(0)
    assert LinkPolicy(DEFAULT_LIMITS, 0.0).goaway_from_peer(ErrorCode.PROTOCOL_ERROR)  # close now


def test_half_close_deadlines_follow_progress():
    p = LinkPolicy(DEFAULT_LIMITS.replace(half_close_timeout=30, keepalive_interval=100, keepalive_timeout=200),
                   now=0.0)
    a, b = S(), S()
    p.half_closed(a, 1.0)
    p.half_closed(b, 5.0)
    assert p.next_deadline() == 31.0
    assert p.expired_half_closed(30.0) == []
    a.last_activity = 20.0  # progress
    assert p.expired_half_closed(31.0) == []
    assert p.expired_half_closed(35.0) == [b]
    assert p.half_closed_streams == {a}
    assert p.expired_half_closed(49.9) == [] and p.expired_half_closed(50.0) == [a]
    p.half_closed(b, 60.0)
    p.forget_half_closed(b)
    assert p.expired_half_closed(1000.0) == []


def test_watermarks_pause_and_resume():
    w = SendWatermarks(Limits(stream_send_high_water=100, stream_send_low_water=40, session_send_high_water=150))
    a, b = S(), S()
    w.add(a, 100)
    assert not a.paused
    w.add(a, 1)
    assert a.paused and w.paused == {a}
    w.remove(a, 60)
    assert not w.resumable(a)  # 41: not below the low mark yet
    w.remove(a, 2)
    assert w.resumable(a) and not a.paused and not w.resumable(a)
    w.add(b, 120)  # the link passes 150: b (writing) pauses, a (idle) does not
    assert b.paused and w.link_full and not a.paused
    w.add(a, 1)  # but a write now does
    assert a.paused
    w.remove(b, 120)
    assert not w.resumable(b)  # the link's flag holds until drained() sees the total fall
    assert w.drained() == [b] and not w.link_full  # a (40) is not below the low mark
    w.remove(a, 1)
    assert w.resumable(a)
    w.forget(a)
    assert w.total == 0 and not a.paused


@given(st.integers(1, 2**20), st.data())
def test_stream_credit_keeps_at_least_half_a_window(window, data):
    limit = window
    consumed = 0
    for _ in range(20):
        consumed = data.draw(st.integers(consumed, limit))
        credit = stream_credit(limit, consumed, window)
        if credit:
            assert limit - consumed <= window // 2
            limit += credit
            assert limit == consumed + window
        assert limit - consumed > window // 2 or limit - consumed == window


@given(st.integers(2, 2**20), st.data())
def test_session_credit_never_exceeds_the_window(window, data):
    limit, received, consumed = window, 0, 0
    for _ in range(30):
        received = data.draw(st.integers(received, limit))
        consumed = data.draw(st.integers(consumed, received))
        credit = session_credit(limit, received, consumed, window)
        limit += credit
        assert limit - consumed <= window  # never more outstanding than one window
        if received == consumed:
            assert limit - consumed > window // 2 - 1  # nothing held: at least half granted


def test_overdraft_credit_only_for_a_starved_reader_and_bounded():
    W = 1000
    # Stalled streams hold the whole window unconsumed; a reader may take 300 more.
    assert overdraft_credit(1000, 1000, 0, W, 300) == 300
    assert overdraft_credit(1000, 1000, 0, W, 0) == 0  # nobody can use it
    assert overdraft_credit(1000, 800, 0, W, 300) == 0  # the peer still holds credit
    assert overdraft_credit(1000, 900, 0, W, 300) == 200  # an eighth or less: topped up to the room
    assert overdraft_credit(2100, 2100, 0, W, 300) == 0  # more than 2 windows held: no more
    assert overdraft_credit(2000, 2000, 0, W, 300) == 300  # at most 2 windows + the room
    # The overdraft is repaid first: no regular credit until consumption catches up with it.
    assert session_credit(1300, 1300, 200, W) == 0
    assert session_credit(1300, 1300, 800, W) == 500


@given(st.integers(8, 2**20), st.data())
def test_overdraft_keeps_the_receiver_within_two_windows_and_a_stream_window(window, data):
    limit, received, consumed = window, 0, 0
    for _ in range(40):
        received = data.draw(st.integers(received, limit))
        consumed = data.draw(st.integers(consumed, received))
        limit += session_credit(limit, received, consumed, window)
        room = data.draw(st.integers(0, window))  # a stream window at most the link's
        limit += overdraft_credit(limit, received, consumed, window, room)
        assert limit - consumed <= 3 * window
        if limit > received + (window >> 3):
            continue
        # The peer is starved: a reader with room is never left without credit while the
        # receiver holds at most two windows.
        if room and received - consumed <= 2 * window:
            assert limit - received >= room


def test_tuned_window_grows_only_when_the_window_holds_the_sender_back():
    KiB = 1024
    # Half a 64 KiB window consumed in 10 ms with a 20 ms round trip: the window is the limit.
    assert tuned_window(64 * KiB, 1024 * KiB, 40 * KiB, 0.010, 0.020) == 128 * KiB
    # The same bytes over 200 ms: the sender (or the path) is the limit, not the window.
    assert tuned_window(64 * KiB, 1024 * KiB, 40 * KiB, 0.200, 0.020) == 64 * KiB
    assert tuned_window(64 * KiB, 1024 * KiB, 40 * KiB, 0.010, None) == 64 * KiB  # no round trip yet
    assert tuned_window(768 * KiB, 1024 * KiB, 500 * KiB, 0.001, 0.020) == 1024 * KiB  # capped
    assert tuned_window(1024 * KiB, 1024 * KiB, 900 * KiB, 0.001, 0.020) == 1024 * KiB


def test_round_trip_is_sampled_while_data_flows():
    p = LinkPolicy(DEFAULT_LIMITS, now=0.0)
    ping = p.data_received(1000, 1.0)
    assert ping is not None and p.data_received(1000, 1.01) is None  # one out at a time
    assert p.ping_acked(ping, 1.02) == pytest.approx(0.02) and p.rtt == pytest.approx(0.02)
    assert p.data_received(1000, 1.05) is None  # not before RTT_SAMPLE_INTERVAL
    assert p.data_received(1000, 1.2) is not None


def test_an_unanswered_sample_ping_does_not_stop_sampling():
    p = LinkPolicy(DEFAULT_LIMITS, now=0.0)
    assert p.data_received(1, 1.0) is not None
    for i in range(20):  # keepalive PINGs push the sample's PING out of memory
        p.new_ping(2.0 + i)
    assert p.data_received(1, 30.0) is not None


def test_retune_ends_the_epoch():
    p = LinkPolicy(DEFAULT_LIMITS.replace(initial_stream_window=64 * 1024), now=0.0)
    p.rtt = 0.02
    s = S()
    s.window, s.epoch_at, s.epoch_consumed = 64 * 1024, 1.0, 0
    p.retune(s, 32 * 1024, 1.005)  # half the window: the epoch goes on
    assert (s.window, s.epoch_at, s.epoch_consumed) == (64 * 1024, 1.0, 0)
    p.retune(s, 40 * 1024, 1.01)
    assert (s.window, s.epoch_at, s.epoch_consumed) == (128 * 1024, 1.01, 40 * 1024)


def test_session_grants_the_grown_window():
    """A session whose peer fills the stream window within a round trip grants more."""
    limits = DEFAULT_LIMITS.replace(initial_stream_window=64 * 1024, max_stream_window=512 * 1024,
                                    session_window=1024 * 1024, max_frame_size=16 * 1024)
    agent, relay = Session(Role.AGENT, limits), Session(Role.RELAY, limits)
    decoder = frames.FrameDecoder(limits.max_frame_size)

    def wire(session) -> bytes:
        return b"".join(bytes(b) for b in session.data_to_send())

    relay.receive_data(wire(agent), 0.0)
    agent.receive_data(wire(relay), 0.0)
    agent.pop_events(), relay.pop_events()
    sid = agent.open_stream(b"bulk")
    increments = []
    now = 0.0
    for _ in range(40):  # each 10 ms round trip: a window's worth one way, credit back
        agent.send_data(sid, b"x" * (64 * 1024))
        now += 0.01
        relay.receive_data(wire(agent), now)
        for event in relay.pop_events():
            if isinstance(event, DataReceived):
                relay.consume(sid, len(event.data))
        out = wire(relay)
        increments += [frames.parse_u32(payload) for ftype, _, fsid, payload in decoder.feed(out)
                       if ftype == FrameType.WINDOW_UPDATE and fsid == sid]
        agent.receive_data(out, now)
        agent.pop_events()
    assert relay._streams[sid].window > 64 * 1024
    assert max(increments) > 64 * 1024  # grants beyond the initial window
