"""The sans-IO session against byte vectors: every rule of docs/PROTOCOL.md with its code."""

from __future__ import annotations

import struct

import orjson
import pytest

from tunnel import codec as frames
from tunnel.core.events import (
    ConnectionClosed,
    ControlReceived,
    DataReceived,
    GoAwayReceived,
    PingAcknowledged,
    SessionReady,
    StreamClosed,
    StreamEnded,
    StreamOpened,
    StreamReset,
    StreamWritable,
)
from tunnel.core.limits import DEFAULT_LIMITS, Limits
from tunnel.core.session import Session
from tunnel.core.session_state import TRANSITIONS, Role, StreamInput, StreamState
from tunnel.wire.constants import MAX_WINDOW, PARTIAL, ErrorCode, Flags, FrameType
from tunnel.wire.errors import SessionClosed, UsageError
from tunnel.wire.errors import StreamClosedError

KiB = 1024
MiB = 1024 * KiB

T = FrameType
FIN = int(Flags.FIN)
ACK = int(Flags.ACK)


# --- helpers ----------------------------------------------------------------------------

def hello_frame(limits: Limits = DEFAULT_LIMITS, lo: int = 1, hi: int = 1) -> bytes:
    return frames.encode_frame(T.HELLO, 0, 0, frames.encode_hello(
        lo, hi, limits.initial_stream_window, limits.session_window, limits.max_frame_size,
        limits.max_concurrent_streams))


def frame(ftype, flags=0, sid=0, payload=b"") -> bytes:
    return frames.encode_frame(ftype, flags, sid, payload)


def u32(v: int) -> bytes:
    return struct.pack("!I", v)


def out_bytes(session: Session, max_bytes=None) -> bytes:
    return b"".join(bytes(b) for b in session.data_to_send(max_bytes))


def parse(data: bytes) -> list[tuple]:
    """Frames as (type, flags, sid, payload bytes), DATA pieces merged."""
    decoder = frames.FrameDecoder(16 * MiB)
    result = []
    pending = bytearray()
    for ftype, flags, sid, payload in decoder.feed(data):
        if flags & PARTIAL:
            pending += payload
            continue
        result.append((ftype, flags, sid, bytes(pending) + bytes(payload)))
        pending.clear()
    assert not pending
    return result


def sent_frames(session: Session, max_bytes=None) -> list[tuple]:
    return parse(out_bytes(session, max_bytes))


def make(role=Role.RELAY, limits=DEFAULT_LIMITS, peer=DEFAULT_LIMITS, now=0.0, tuning=False) -> Session:
    """A session that got the peer's HELLO, with its own HELLO and events already taken.
    Window auto-tuning (its PINGs) is off unless asked for, so that frames are exact."""
    if not tuning:
        limits = limits.replace(max_stream_window=limits.initial_stream_window)
    s = Session(role, limits, now=now)
    s.receive_data(hello_frame(peer), now)
    assert s.pop_events() == [SessionReady(1)]
    out_bytes(s)
    return s


def closed_with(session: Session, code: int) -> ConnectionClosed:
    events = session.pop_events()
    closes = [e for e in events if isinstance(e, ConnectionClosed)]
    assert len(closes) == 1, events
    assert closes[0].code == code, closes[0]
    assert closes[0].remote is False
    assert session.closed
    goaways = [f for f in sent_frames(session) if f[0] == T.GOAWAY]
    assert goaways and frames.parse_goaway(goaways[-1][3])[1] == code
    return closes[0]


def norm(events):
    return [DataReceived(e.stream_id, bytes(e.data)) if isinstance(e, DataReceived) else e for e in events]


# Peer-opened streams: the test session is the RELAY (even ids), the peer the agent (odd).
def open_frame(sid=1, meta=b"db", flags=0) -> bytes:
    return frame(T.OPEN, flags, sid, meta)


# --- HELLO ------------------------------------------------------------------------------

def test_hello_is_queued_first_with_exact_bytes():
    s = Session(Role.AGENT)
    payload = struct.pack("!BBHIIII", 1, 1, 0, 8 * MiB, 64 * MiB, 256 * KiB, 8192)
    assert out_bytes(s) == struct.pack("!BBHII", 6, 0, 0, 0, len(payload)) + payload
    assert not s.ready and s.version is None


def test_ready_after_peer_hello_and_version_negotiation():
    s = Session(Role.AGENT)
    s.receive_data(hello_frame(lo=1, hi=7), 1.0)
    assert s.pop_events() == [SessionReady(1)]
    assert s.ready and s.version == 1


@pytest.mark.parametrize("lo,hi", [(2, 3), (3, 2), (0, 0)])
def test_version_mismatch(lo, hi):
    s = Session(Role.RELAY)
    out_bytes(s)
    s.receive_data(hello_frame(lo=lo, hi=hi), 0)
    closed_with(s, ErrorCode.VERSION_MISMATCH)


@pytest.mark.parametrize("bad", [
    frame(T.PING, 0, 0, b"12345678"),
    frame(T.OPEN, 0, 1, b"x"),
    frame(T.CONTROL, 0, 0, b"{}"),
])
def test_frame_before_hello_is_protocol_error(bad):
    s = Session(Role.RELAY)
    s.receive_data(bad, 0)
    closed_with(s, ErrorCode.PROTOCOL_ERROR)


def test_second_hello_and_bad_hello_fields():
    s = make()
    s.receive_data(hello_frame(), 0)
    closed_with(s, ErrorCode.PROTOCOL_ERROR)
    s = Session(Role.RELAY)
    s.receive_data(frame(T.HELLO, 0, 0, frames.encode_hello(1, 1, 1000, 1000, 1000, 10)), 0)
    closed_with(s, ErrorCode.PROTOCOL_ERROR)  # max frame size below 16 KiB
    s = Session(Role.RELAY)
    s.receive_data(frame(T.HELLO, 0, 0, frames.encode_hello(1, 1, 0, 1000, 16 * KiB, 10)), 0)
    closed_with(s, ErrorCode.PROTOCOL_ERROR)  # zero window
    s = Session(Role.RELAY)
    s.receive_data(frame(T.HELLO, 0, 0, b"\x01\x01"), 0)
    closed_with(s, ErrorCode.PROTOCOL_ERROR)  # short


def test_open_before_ready_is_usage_error_but_control_is_allowed():
    s = Session(Role.AGENT)
    with pytest.raises(UsageError):
        s.open_stream(b"db")
    s.send_control({"type": "auth", "token": "t"})
    got = sent_frames(s)
    assert [f[0] for f in got] == [T.HELLO, T.CONTROL]
    assert orjson.loads(got[1][3]) == {"type": "auth", "token": "t"}


# --- header-level errors -----------------------------------------------------------------

def test_frame_too_large_unknown_type_reserved_bits():
    small = DEFAULT_LIMITS.replace(max_frame_size=16 * KiB)
    s = make(limits=small)
    s.receive_data(struct.pack("!BBHII", 0, 0, 0, 1, 16 * KiB + 1), 0)
    closed_with(s, ErrorCode.FRAME_SIZE_ERROR)
    s = make()
    s.receive_data(struct.pack("!BBHII", 9, 0, 0, 0, 0), 0)
    closed_with(s, ErrorCode.PROTOCOL_ERROR)
    s = make()
    s.receive_data(struct.pack("!BBHII", 4, 0, 1, 0, 8) + b"x" * 8, 0)
    closed_with(s, ErrorCode.PROTOCOL_ERROR)
    s = make()
    s.receive_data(struct.pack("!BBHII", 2, FIN, 0, 1, 4) + u32(0), 0)  # FIN on RESET
    closed_with(s, ErrorCode.PROTOCOL_ERROR)


# --- streams ------------------------------------------------------------------------------

def test_peer_open_and_data_events():
    s = make()
    s.receive_data(open_frame(1, b"db") + frame(T.DATA, 0, 1, b"hello") + frame(T.DATA, FIN, 1, b"!"), 0)
    assert norm(s.pop_events()) == [
        StreamOpened(1, b"db"), DataReceived(1, b"hello"), DataReceived(1, b"!"), StreamEnded(1)]
    assert s.bytes_received == 6
    assert s.open_stream_count == 1
    # No credit on receipt.
    assert out_bytes(s) == b""


def test_open_with_fin_then_answer_closes_stream():
    s = make()
    s.receive_data(open_frame(1, b"x", FIN), 0)
    assert s.pop_events() == [StreamOpened(1, b"x"), StreamEnded(1)]
    s.send_data(1, b"reply", end_stream=True)
    assert out_bytes(s) == frame(T.DATA, FIN, 1, b"reply")
    assert s.pop_events() == [StreamClosed(1)]
    assert s.open_stream_count == 0


def test_receiver_collects_data_instead_of_events():
    s = make()
    s.receive_data(open_frame(1) + open_frame(3), 0)
    assert s.pop_events() == [StreamOpened(1, b"db"), StreamOpened(3, b"db")]
    s.set_receiver(1, "one")
    s.set_receiver(3, "three")
    s.receive_data(frame(T.DATA, 0, 3, b"a") + frame(T.DATA, 0, 1, b"bb") + frame(T.DATA, 0, 3, b"ccc")
                   + frame(T.DATA, FIN, 1, b"") + frame(T.DATA, FIN, 3, b"d"), 0)
    # One entry per stream, in the order the streams first got data; no DataReceived events,
    # the other events after the data (the caller pops them second).
    received = [(r, [bytes(p) for p in payloads]) for r, payloads in s.pop_received()]
    assert received == [("three", [b"a", b"ccc", b"d"]), ("one", [b"bb"])]
    assert s.pop_events() == [StreamEnded(1), StreamEnded(3)]
    assert s.pop_received() == []
    assert s.received_unconsumed == 7  # credit still waits for consume
    s.consume(3, 5)
    s.consume(1, 2)
    assert s.received_unconsumed == 0


def test_receiver_data_before_a_reset_in_the_same_input():
    s = make()
    s.receive_data(open_frame(1), 0)
    s.pop_events()
    s.set_receiver(1, "r")
    s.receive_data(frame(T.DATA, 0, 1, b"last") + frame(T.RESET, 0, 1, u32(ErrorCode.CONNECTION_RESET)), 0)
    assert [(r, [bytes(p) for p in ps]) for r, ps in s.pop_received()] == [("r", [b"last"])]
    assert s.pop_events() == [StreamReset(1, ErrorCode.CONNECTION_RESET, True), StreamClosed(1)]


def test_streams_without_receiver_keep_data_events():
    s = make()
    s.receive_data(open_frame(1) + open_frame(3), 0)
    s.pop_events()
    s.set_receiver(3, "r")
    s.set_receiver(99, "nobody")  # unknown stream: nothing happens
    s.receive_data(frame(T.DATA, 0, 1, b"x") + frame(T.DATA, 0, 3, b"y"), 0)
    assert norm(s.pop_events()) == [DataReceived(1, b"x")]
    assert [(r, [bytes(p) for p in ps]) for r, ps in s.pop_received()] == [("r", [b"y"])]


@pytest.mark.parametrize("sid", [2, 0])
def test_open_wrong_parity(sid):
    s = make()  # relay: the peer (agent) opens odd ids
    s.receive_data(open_frame(sid), 0)
    closed_with(s, ErrorCode.PROTOCOL_ERROR)


def test_open_not_monotonic():
    s = make()
    s.receive_data(open_frame(5), 0)
    s.receive_data(open_frame(3), 0)
    closed_with(s, ErrorCode.PROTOCOL_ERROR)
    s = make()
    s.receive_data(open_frame(5) + frame(T.RESET, 0, 5, u32(0)) + open_frame(5), 0)
    closed_with(s, ErrorCode.PROTOCOL_ERROR)


def test_local_ids_have_role_parity():
    agent = make(Role.AGENT)
    assert [agent.open_stream() for _ in range(3)] == [1, 3, 5]
    relay = make(Role.RELAY)
    assert [relay.open_stream() for _ in range(3)] == [2, 4, 6]
    assert sent_frames(relay) == [(T.OPEN, 0, 2, b""), (T.OPEN, 0, 4, b""), (T.OPEN, 0, 6, b"")]


@pytest.mark.parametrize("bad", [
    frame(T.DATA, 0, 7, b"x"),            # peer id never opened
    frame(T.DATA, 0, 8, b"x"),            # our id never opened
    frame(T.RESET, 0, 9, u32(0)),
    frame(T.WINDOW_UPDATE, 0, 11, u32(5)),
    frame(T.DATA, 0, 0, b"x"),            # stream 0
    frame(T.RESET, 0, 0, u32(0)),
])
def test_frames_for_never_opened_ids(bad):
    s = make()
    s.receive_data(bad, 0)
    closed_with(s, ErrorCode.PROTOCOL_ERROR)


def test_frames_for_recently_closed_streams_are_ignored_and_credit_the_session():
    limits = DEFAULT_LIMITS.replace(initial_stream_window=64 * KiB, session_window=64 * KiB, max_frame_size=64 * KiB)
    s = make(limits=limits)
    s.receive_data(open_frame(1), 0)
    s.reset_stream(1, ErrorCode.CONNECT_FAILED)
    assert sent_frames(s) == [(T.RESET, 0, 1, u32(ErrorCode.CONNECT_FAILED))]
    assert s.pop_events() == [StreamOpened(1, b"db"), StreamClosed(1)]
    # In-flight frames: ignored; the DATA bytes go straight back to the session window.
    s.receive_data(frame(T.DATA, 0, 1, b"a" * 40 * KiB) + frame(T.WINDOW_UPDATE, 0, 1, u32(9))
                   + frame(T.RESET, 0, 1, u32(0)) + frame(T.DATA, FIN, 1, b""), 0)
    assert s.pop_events() == []
    assert sent_frames(s) == [(T.WINDOW_UPDATE, 0, 0, u32(40 * KiB))]
    assert not s.closed
    # The whole session window is usable again by another stream.
    s.receive_data(open_frame(3) + frame(T.DATA, 0, 3, b"b" * 64 * KiB), 0)
    assert not s.closed


def test_data_after_fin_resets_stream_with_stream_closed():
    s = make()
    s.receive_data(open_frame(1) + frame(T.DATA, FIN, 1, b"x"), 0)
    s.pop_events()
    s.send_data(1, b"pending")  # dropped by the reset
    s.receive_data(frame(T.DATA, 0, 1, b"more"), 0)
    assert s.pop_events() == [StreamReset(1, ErrorCode.STREAM_CLOSED, False), StreamClosed(1)]
    assert sent_frames(s) == [(T.RESET, 0, 1, u32(ErrorCode.STREAM_CLOSED))]
    assert not s.closed and s.open_stream_count == 0 and s.send_buffered_total == 0


def test_peer_reset_drops_queue_and_reports():
    s = make()
    s.receive_data(open_frame(1), 0)
    s.pop_events()
    s.send_data(1, b"x" * 1000)
    s.receive_data(frame(T.RESET, 0, 1, u32(ErrorCode.CONNECTION_RESET)), 0)
    assert s.pop_events() == [StreamReset(1, ErrorCode.CONNECTION_RESET, True), StreamClosed(1)]
    assert out_bytes(s) == b""
    assert s.send_buffered_total == 0
    with pytest.raises(StreamClosedError):
        s.send_data(1, b"late")
    s.reset_stream(1)  # no-op on a closed stream
    assert out_bytes(s) == b""


def test_api_misuse_raises_usage_errors():
    s = make(Role.AGENT)
    sid = s.open_stream(b"x")
    s.end_stream(sid)
    with pytest.raises(StreamClosedError):
        s.send_data(sid, b"after fin")
    with pytest.raises(StreamClosedError):
        s.end_stream(sid)
    with pytest.raises(StreamClosedError):
        s.send_data(99, b"x")
    sid2 = s.open_stream(b"y", end_stream=True)
    with pytest.raises(StreamClosedError):
        s.send_data(sid2, b"x")
    assert sent_frames(s) == [(T.OPEN, 0, 1, b"x"), (T.OPEN, FIN, 3, b"y"), (T.DATA, FIN, 1, b"")]


def test_state_table_is_complete_for_the_spec():
    S, I = StreamState, StreamInput
    assert TRANSITIONS[S.OPEN, I.RECV_FIN] == S.HALF_CLOSED_REMOTE
    assert TRANSITIONS[S.HALF_CLOSED_LOCAL, I.RECV_FIN] == S.CLOSED
    assert TRANSITIONS[S.HALF_CLOSED_REMOTE, I.SEND_FIN] == S.CLOSED
    assert (S.HALF_CLOSED_REMOTE, I.RECV_DATA) not in TRANSITIONS
    assert (S.HALF_CLOSED_LOCAL, I.SEND_DATA) not in TRANSITIONS
    for state in (S.OPEN, S.HALF_CLOSED_LOCAL, S.HALF_CLOSED_REMOTE):
        assert TRANSITIONS[state, I.RECV_RESET] == S.CLOSED
        assert TRANSITIONS[state, I.SEND_RESET] == S.CLOSED
    assert not any(state == S.CLOSED for state, _ in TRANSITIONS)


def test_stream_closed_after_both_fins_and_state_forgotten():
    s = make(Role.AGENT)
    sid = s.open_stream(b"db")
    s.send_data(sid, b"req", end_stream=True)
    assert sent_frames(s) == [(T.OPEN, 0, 1, b"db"), (T.DATA, FIN, 1, b"req")]
    s.receive_data(frame(T.DATA, 0, 1, b"resp") + frame(T.DATA, FIN, 1, b""), 0)
    assert norm(s.pop_events()) == [DataReceived(1, b"resp"), StreamEnded(1), StreamClosed(1)]
    assert s.open_stream_count == 0 and s.stream_ids() == []
    s.consume(1, 4)  # after close: still credits the session, no error
    assert not s.closed


# --- flow control ----------------------------------------------------------------------

SMALL = DEFAULT_LIMITS.replace(max_frame_size=16 * KiB, initial_stream_window=32 * KiB,
                               session_window=64 * KiB, send_quantum=8 * KiB,
                               stream_send_high_water=40 * KiB, stream_send_low_water=10 * KiB,
                               session_send_high_water=100 * KiB)


def test_exceeding_stream_window_is_flow_control_error():
    s = make(limits=SMALL)
    s.receive_data(open_frame(1) + frame(T.DATA, 0, 1, b"a" * 16 * KiB) + frame(T.DATA, 0, 1, b"a" * 16 * KiB), 0)
    assert not s.closed
    s.receive_data(frame(T.DATA, 0, 1, b"a"), 0)
    closed_with(s, ErrorCode.FLOW_CONTROL_ERROR)


def test_exceeding_session_window_is_flow_control_error():
    # Streams that are never consumed may hold the session window (64 KiB), the overdraft
    # granted to the streams that still look like readers (64 KiB more) and one stream
    # window (32 KiB); beyond that, DATA is a FLOW_CONTROL_ERROR.
    s = make(limits=SMALL)
    data = b""
    for sid in (1, 3, 5, 7, 9):
        data += open_frame(sid) + frame(T.DATA, 0, sid, b"a" * 16 * KiB) + frame(T.DATA, 0, sid, b"a" * 16 * KiB)
    s.receive_data(data, 0)
    assert not s.closed and s.received_unconsumed == 160 * KiB
    s.receive_data(open_frame(11) + frame(T.DATA, 0, 11, b"a" * 16 * KiB), 0)
    closed_with(s, ErrorCode.FLOW_CONTROL_ERROR)


def test_credit_is_granted_on_consume_at_half_window():
    s = make(limits=SMALL)
    s.receive_data(open_frame(1) + frame(T.DATA, 0, 1, b"a" * 16 * KiB), 0)
    s.pop_events()
    assert out_bytes(s) == b""  # nothing on receipt
    s.consume(1, 16 * KiB - 1)
    assert out_bytes(s) == b""
    s.consume(1, 1)  # half the stream window consumed
    assert sent_frames(s) == [(T.WINDOW_UPDATE, 0, 1, u32(16 * KiB))]
    # Session: granted once the consumed credit reaches what the peer has left (48 - 32).
    s.receive_data(frame(T.DATA, 0, 1, b"a" * 16 * KiB) + frame(T.DATA, 0, 1, b"a" * 16 * KiB), 0)
    s.consume(1, 32 * KiB)
    assert sent_frames(s) == [(T.WINDOW_UPDATE, 0, 1, u32(32 * KiB)), (T.WINDOW_UPDATE, 0, 0, u32(48 * KiB))]


def test_session_credit_rule_exact():
    s = make(limits=SMALL)
    s.receive_data(open_frame(1) + frame(T.DATA, 0, 1, b"a" * 16 * KiB) + frame(T.DATA, 0, 1, b"a" * 16 * KiB), 0)
    # Peer has 32 KiB session credit left; consuming 32 KiB makes pending == left: grant.
    s.consume(1, 16 * KiB)
    assert sent_frames(s) == [(T.WINDOW_UPDATE, 0, 1, u32(16 * KiB))]
    s.consume(1, 16 * KiB)
    assert sent_frames(s) == [(T.WINDOW_UPDATE, 0, 1, u32(16 * KiB)), (T.WINDOW_UPDATE, 0, 0, u32(32 * KiB))]


def test_stalled_streams_do_not_starve_the_session():
    # Two streams fill 56 KiB of a 64 KiB session window and are never consumed; a third
    # stream's consumed bytes still come back as session credit.
    s = make(limits=SMALL)
    s.receive_data(open_frame(1) + frame(T.DATA, 0, 1, b"a" * 16 * KiB) + frame(T.DATA, 0, 1, b"a" * 12 * KiB), 0)
    s.receive_data(open_frame(3) + frame(T.DATA, 0, 3, b"a" * 16 * KiB) + frame(T.DATA, 0, 3, b"a" * 12 * KiB), 0)
    s.receive_data(open_frame(5) + frame(T.DATA, 0, 5, b"a" * 8 * KiB), 0)
    assert s.received_unconsumed == 64 * KiB
    s.consume(5, 8 * KiB)
    # 8 KiB consumed go back, and the peer, left with no more than that, gets an overdraft up
    # to what stream 5 may still be sent (24 KiB in all).
    assert (T.WINDOW_UPDATE, 0, 0, u32(24 * KiB)) in sent_frames(s)


def test_consume_is_clamped():
    s = make(limits=SMALL)
    s.receive_data(open_frame(1) + frame(T.DATA, 0, 1, b"a" * 100), 0)
    s.consume(1, 10 ** 9)
    s.consume(77, 10 ** 9)  # unknown stream: clamped to the session's unconsumed (0)
    assert s.received_unconsumed == 0
    assert out_bytes(s) == b""


def test_window_update_errors():
    s = make()
    s.receive_data(frame(T.WINDOW_UPDATE, 0, 0, u32(0)), 0)
    closed_with(s, ErrorCode.PROTOCOL_ERROR)
    s = make()
    s.receive_data(frame(T.WINDOW_UPDATE, 0, 0, u32(MAX_WINDOW)), 0)
    closed_with(s, ErrorCode.FLOW_CONTROL_ERROR)
    s = make()
    s.receive_data(open_frame(1) + frame(T.WINDOW_UPDATE, 0, 1, u32(MAX_WINDOW - 8 * MiB + 1)), 0)
    closed_with(s, ErrorCode.FLOW_CONTROL_ERROR)
    s = make()
    s.receive_data(open_frame(1) + frame(T.WINDOW_UPDATE, 0, 1, b"\x00\x01"), 0)
    closed_with(s, ErrorCode.PROTOCOL_ERROR)


def test_sender_respects_peer_windows_and_frame_size():
    s = make(Role.AGENT, peer=SMALL)
    sid = s.open_stream()
    payload = bytes(range(256)) * 256 + b"tail"  # 64 KiB + 4
    s.send_data(sid, payload)
    got = sent_frames(s)
    data = [f for f in got if f[0] == T.DATA]
    assert sum(len(f[3]) for f in data) == 32 * KiB  # the peer's stream window
    assert all(len(f[3]) <= SMALL.max_frame_size for f in data)
    assert s.send_buffered(sid) == 32 * KiB + 4
    s.receive_data(frame(T.WINDOW_UPDATE, 0, sid, u32(100 * KiB)), 0)
    data = [f for f in sent_frames(s) if f[0] == T.DATA]
    assert sum(len(f[3]) for f in data) == 32 * KiB  # now the session window (64 KiB) is used up
    s.receive_data(frame(T.WINDOW_UPDATE, 0, 0, u32(1)), 0)
    assert sent_frames(s) == [(T.DATA, 0, sid, b"t")]
    assert s.bytes_sent == 64 * KiB + 1


def test_frames_never_exceed_peer_max_frame_size():
    peer = DEFAULT_LIMITS.replace(max_frame_size=16 * KiB)
    s = make(Role.AGENT, limits=DEFAULT_LIMITS.replace(send_quantum=1 * MiB), peer=peer)
    sid = s.open_stream()
    s.send_data(sid, b"z" * 100_000)
    data = [f for f in sent_frames(s) if f[0] == T.DATA]
    assert max(len(f[3]) for f in data) == 16 * KiB
    assert b"".join(f[3] for f in data) == b"z" * 100_000


def test_zero_copy_output():
    s = make(Role.AGENT)
    sid = s.open_stream()
    out_bytes(s)
    payload = bytearray(b"q" * 1000)
    s.send_data(sid, payload)
    bufs = s.data_to_send()
    assert len(bufs) == 2 and isinstance(bufs[1], memoryview) and bufs[1].obj is payload
    assert bytes(bufs[0]) == frames.encode_header(T.DATA, 0, sid, 1000)


def test_max_bytes_budget_and_fin_piggyback():
    s = make(Role.AGENT)
    sid = s.open_stream()
    out_bytes(s)
    s.send_data(sid, b"a" * 100, end_stream=True)
    first = out_bytes(s, max_bytes=12 + 40)
    assert parse(first) == [(T.DATA, 0, sid, b"a" * 40)]
    assert parse(out_bytes(s)) == [(T.DATA, FIN, sid, b"a" * 60)]


def test_control_frames_go_before_data_and_round_robin_is_fair():
    s = make(Role.AGENT, limits=DEFAULT_LIMITS.replace(send_quantum=16 * KiB))
    a, b = s.open_stream(b"a"), s.open_stream(b"b")
    s.send_data(a, b"A" * 48 * KiB)
    s.send_data(b, b"B" * 48 * KiB)
    s.ping(0)
    got = sent_frames(s)
    assert [f[0] for f in got[:3]] == [T.OPEN, T.OPEN, T.PING]
    order = [f[2] for f in got[3:]]
    assert order == [a, b, a, b, a, b]
    assert all(len(f[3]) == 16 * KiB for f in got[3:])


def test_paused_and_writable():
    s = make(Role.AGENT, limits=SMALL, peer=SMALL)
    sid = s.open_stream()
    s.send_data(sid, b"x" * 30 * KiB)
    assert not s.stream_paused(sid)
    s.send_data(sid, b"x" * 30 * KiB)  # 60 KiB > 40 KiB high water
    assert s.stream_paused(sid)
    out_bytes(s)  # 32 KiB (stream window) leave: 28 KiB queued, still above low water
    assert s.stream_paused(sid) and s.pop_events() == []
    s.receive_data(frame(T.WINDOW_UPDATE, 0, sid, u32(32 * KiB)), 0)
    out_bytes(s)
    assert s.pop_events() == [StreamWritable(sid)]
    assert not s.stream_paused(sid)


def test_session_high_water_pauses_every_stream():
    limits = SMALL.replace(session_send_high_water=50 * KiB)
    s = make(Role.AGENT, limits=limits, peer=SMALL)
    a, b = s.open_stream(), s.open_stream()
    s.send_data(a, b"x" * 39 * KiB)
    s.send_data(b, b"x" * 39 * KiB)  # 78 KiB > 50 KiB across the session
    assert s.stream_paused(b) and not s.stream_paused(a)  # asking has no side effect ...
    s.send_data(a, b"y")  # ... but any write while the session is over the mark pauses
    assert s.stream_paused(a) and s.stream_paused(a)
    s.reset_stream(b)
    out_bytes(s)
    assert StreamWritable(a) in s.pop_events() or s.stream_paused(a)


# --- PING, keepalive, floods ------------------------------------------------------------

def test_ping_is_answered_and_rtt_measured():
    s = make()
    s.receive_data(frame(T.PING, 0, 0, b"abcdefgh"), 1.0)
    assert out_bytes(s) == frame(T.PING, ACK, 0, b"abcdefgh")
    s.ping(2.0)
    (ping,) = sent_frames(s)
    assert ping[:3] == (T.PING, 0, 0)
    s.receive_data(frame(T.PING, ACK, 0, b"zzzzzzzz"), 2.1)  # unsolicited ACK: ignored
    s.receive_data(frame(T.PING, ACK, 0, ping[3]), 2.5)
    assert s.pop_events() == [PingAcknowledged(0.5)] and s.rtt == 0.5
    s.receive_data(frame(T.PING, 0, 0, b"short"), 3)
    closed_with(s, ErrorCode.PROTOCOL_ERROR)


def test_ping_flood_is_enhance_your_calm():
    s = make(limits=DEFAULT_LIMITS.replace(max_ping_rate=5))
    for i in range(5):
        s.receive_data(frame(T.PING, 0, 0, b"p" * 8), 10.0 + i * 0.1)
    assert not s.closed
    s.receive_data(frame(T.PING, 0, 0, b"p" * 8), 10.6)
    closed_with(s, ErrorCode.ENHANCE_YOUR_CALM)
    # The same number spread over time is fine.
    s = make(limits=DEFAULT_LIMITS.replace(max_ping_rate=5))
    for i in range(30):
        s.receive_data(frame(T.PING, 0, 0, b"p" * 8), 10.0 + i * 0.3)
    assert not s.closed


def test_keepalive_ping_then_timeout():
    limits = DEFAULT_LIMITS.replace(keepalive_interval=5, keepalive_timeout=15)
    s = make(limits=limits, now=100.0)
    assert s.next_timer() == 105.0
    s.handle_timer(104.0)
    assert out_bytes(s) == b""
    s.handle_timer(105.0)
    (ping,) = sent_frames(s)
    assert ping[0] == T.PING and ping[1] == 0
    assert s.next_timer() == 110.0
    s.receive_data(frame(T.PING, ACK, 0, ping[3]), 106.0)  # the peer is alive
    assert s.pop_events() == [PingAcknowledged(1.0)]
    assert s.next_timer() == 111.0
    s.handle_timer(111.0)
    s.handle_timer(116.0)
    assert [f[0] for f in sent_frames(s)] == [T.PING, T.PING]
    s.handle_timer(121.0)
    closed_with(s, ErrorCode.TIMEOUT)
    assert s.next_timer() is None


def test_stream_churn_flood():
    s = make(limits=DEFAULT_LIMITS.replace(max_stream_churn_rate=10))
    data = b""
    for i in range(5):
        sid = 2 * i + 1
        data += open_frame(sid) + frame(T.RESET, 0, sid, u32(0))
    s.receive_data(data, 0.0)
    assert not s.closed
    s.receive_data(open_frame(11), 0.5)
    closed_with(s, ErrorCode.ENHANCE_YOUR_CALM)


def test_max_concurrent_streams_resets_with_stream_limit():
    s = make(limits=DEFAULT_LIMITS.replace(max_concurrent_streams=2))
    s.receive_data(open_frame(1) + open_frame(3) + open_frame(5) + frame(T.DATA, 0, 5, b"ignored"), 0)
    assert [type(e) for e in s.pop_events()] == [StreamOpened, StreamOpened]
    assert sent_frames(s) == [(T.RESET, 0, 5, u32(ErrorCode.STREAM_LIMIT))]
    assert not s.closed
    s.receive_data(frame(T.RESET, 0, 1, u32(0)) + open_frame(7), 0)
    assert [type(e) for e in s.pop_events()] == [StreamReset, StreamClosed, StreamOpened]


def test_half_close_timeout_resets_stalled_stream():
    limits = DEFAULT_LIMITS.replace(half_close_timeout=30.0, keepalive_interval=100, keepalive_timeout=200)
    s = make(limits=limits, now=0.0)
    s.receive_data(open_frame(1) + frame(T.DATA, FIN, 1, b"req"), 1.0)
    s.receive_data(open_frame(3), 1.0)  # open both ways: no timeout
    s.pop_events()
    assert s.next_timer() == 31.0
    s.handle_timer(20.0)
    s.send_data(1, b"progress")  # activity at t=20 pushes the deadline
    out_bytes(s)
    s.handle_timer(31.0)
    assert s.pop_events() == [] and s.next_timer() == 50.0
    s.handle_timer(50.0)
    assert s.pop_events() == [StreamReset(1, ErrorCode.TIMEOUT, False), StreamClosed(1)]
    assert sent_frames(s) == [(T.RESET, 0, 1, u32(ErrorCode.TIMEOUT))]
    assert s.open_stream_count == 1 and not s.closed


# --- GOAWAY and close -------------------------------------------------------------------

def test_goaway_received_refuses_streams_above_last_and_drains():
    s = make(Role.AGENT)
    a, b = s.open_stream(), s.open_stream()
    out_bytes(s)
    s.receive_data(frame(T.GOAWAY, 0, 0, frames.encode_goaway(a, 0, "maintenance")), 0)
    assert s.pop_events() == [GoAwayReceived(a, 0, "maintenance"), StreamReset(b, ErrorCode.REFUSED, True),
                              StreamClosed(b)]
    assert s.is_closing and not s.closed
    with pytest.raises(SessionClosed):
        s.open_stream()
    s.send_data(a, b"last", end_stream=True)
    s.receive_data(frame(T.DATA, FIN, a, b""), 0)
    assert sent_frames(s) == [(T.DATA, FIN, a, b"last")]
    assert s.pop_events() == [StreamEnded(a), StreamClosed(a), ConnectionClosed(0, "drained", True)]
    assert s.closed


def test_goaway_sent_refuses_new_peer_streams():
    s = make()
    s.receive_data(open_frame(1), 0)
    s.goaway(reason="bye")
    assert sent_frames(s) == [(T.GOAWAY, 0, 0, frames.encode_goaway(1, 0, "bye"))]
    s.receive_data(open_frame(3), 0)
    assert sent_frames(s) == [(T.RESET, 0, 3, u32(ErrorCode.REFUSED))]
    s.receive_data(frame(T.DATA, FIN, 1, b""), 0)
    s.end_stream(1)
    out_bytes(s)
    events = s.pop_events()
    assert events[-1] == ConnectionClosed(0, "drained", False)


def test_goaway_with_error_closes():
    s = make()
    s.receive_data(open_frame(1), 0)
    s.receive_data(frame(T.GOAWAY, 0, 0, frames.encode_goaway(0, ErrorCode.UNAUTHORIZED, "bad token")), 0)
    assert s.pop_events()[1:] == [GoAwayReceived(0, ErrorCode.UNAUTHORIZED, "bad token"),
                                  StreamReset(1, ErrorCode.UNAUTHORIZED, True), StreamClosed(1),
                                  ConnectionClosed(ErrorCode.UNAUTHORIZED, "bad token", True)]
    s.receive_data(frame(T.PING, 0, 0, b"12345678"), 0)  # ignored after close
    assert out_bytes(s) == b""


def test_close_sends_goaway_and_ignores_input():
    s = make()
    s.receive_data(open_frame(1), 0)
    s.pop_events()
    s.send_data(1, b"dropped")
    s.close(ErrorCode.NO_ERROR, "shutdown")
    assert out_bytes(s) == frame(T.GOAWAY, 0, 0, frames.encode_goaway(1, 0, "shutdown"))
    assert s.pop_events() == [StreamReset(1, 0, False), StreamClosed(1), ConnectionClosed(0, "shutdown", False)]
    s.receive_data(frame(T.PING, 0, 0, b"12345678"), 0)
    assert out_bytes(s) == b"" and s.pop_events() == []
    with pytest.raises(SessionClosed):
        s.send_control({"type": "x"})
    s.close()  # idempotent
    assert s.pop_events() == []


def test_goaway_payload_errors():
    s = make()
    s.receive_data(frame(T.GOAWAY, 0, 0, b"\x00"), 0)
    closed_with(s, ErrorCode.PROTOCOL_ERROR)
    s = make()
    s.receive_data(frame(T.GOAWAY, 0, 3, frames.encode_goaway(0, 0)), 0)
    closed_with(s, ErrorCode.PROTOCOL_ERROR)


# --- CONTROL ------------------------------------------------------------------------------

def test_control_messages():
    s = make()
    s.receive_data(frame(T.CONTROL, 0, 0, b'{"type":"registered","x":[1]}'), 0)
    assert s.pop_events() == [ControlReceived({"type": "registered", "x": [1]})]
    s.send_control({"type": "error", "code": "unauthorized"})
    assert out_bytes(s) == frame(T.CONTROL, 0, 0, b'{"type":"error","code":"unauthorized"}')
    for bad in (b"not json", b"[1,2]", b"{}", b'{"type":1}', b'{"type":"t","n":NaN}', b'{"type":"\xff"}',
                b"[" * 50_000):
        s = make()
        s.receive_data(frame(T.CONTROL, 0, 0, bad), 0)
        closed_with(s, ErrorCode.PROTOCOL_ERROR)
    s = make(limits=DEFAULT_LIMITS.replace(max_control_size=100))
    s.receive_data(frame(T.CONTROL, 0, 0, b'{"a":"' + b"x" * 100 + b'"}'), 0)
    closed_with(s, ErrorCode.FRAME_SIZE_ERROR)
    with pytest.raises(UsageError):
        make(limits=DEFAULT_LIMITS.replace(max_control_size=100)).send_control({"a": "x" * 100})


# --- byte-at-a-time ----------------------------------------------------------------------

def test_byte_at_a_time_equals_whole():
    stream = (hello_frame() + open_frame(1, b"meta") + frame(T.DATA, 0, 1, b"0123456789" * 50)
              + frame(T.PING, 0, 0, b"pingpong") + frame(T.CONTROL, 0, 0, b'{"type":"t"}')
              + frame(T.DATA, FIN, 1, b"end") + frame(T.WINDOW_UPDATE, 0, 0, u32(5)))
    whole = Session(Role.RELAY)
    whole.receive_data(stream, 0)
    piecewise = Session(Role.RELAY)
    got = []
    for i in range(len(stream)):
        piecewise.receive_data(stream[i:i + 1], 0)
        got.extend(norm(piecewise.pop_events()))

    def merged(events):
        result = []
        for e in events:
            if isinstance(e, DataReceived) and result and isinstance(result[-1], DataReceived):
                result[-1] = DataReceived(e.stream_id, result[-1].data + e.data)
            else:
                result.append(e)
        return result

    assert merged(got) == merged(norm(whole.pop_events()))
    assert out_bytes(whole) == out_bytes(piecewise)
    assert not piecewise.closed
