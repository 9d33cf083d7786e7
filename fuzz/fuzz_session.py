"""Atheris harness: the sans-IO :class:`tunnel.core.session.Session` fed hostile bytes.

Property: ``receive_data`` never raises; whatever the input, the session either stays open
or closes with a wire error code for a documented ``ProtocolError`` (never
``INTERNAL_ERROR``, which would mean a bug caught by the session's last-resort handler);
it can always produce its output and its timers. The input starts after a valid HELLO, so
the fuzzer spends its time past the handshake, on both roles.

    python3 fuzz/fuzz_session.py -max_total_time=60      # see fuzz/README.md
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tunnel import codec as frames  # noqa: E402
from tunnel.core.events import ConnectionClosed, DataReceived  # noqa: E402
from tunnel.core.limits import Limits  # noqa: E402
from tunnel.core.session import Session  # noqa: E402
from tunnel.core.session_state import Role  # noqa: E402
from tunnel.wire.constants import ErrorCode, FrameType  # noqa: E402

LIMITS = Limits(max_frame_size=16 * 1024, initial_stream_window=64 * 1024, session_window=256 * 1024,
                max_concurrent_streams=16, max_control_size=4096)
HELLO = frames.encode_frame(FrameType.HELLO, 0, 0, frames.encode_hello(1, 1, 64 * 1024, 256 * 1024, 16 * 1024, 16))


def one_input(data: bytes) -> None:
    if not data:
        return
    role = Role.RELAY if data[0] & 1 else Role.AGENT
    with_hello = not data[0] & 2
    step = (data[0] >> 2) % 31 + 1
    session = Session(role, LIMITS, now=0.0)
    session.data_to_send()
    if with_hello:
        session.receive_data(HELLO, 0.0)
        _check(session)
        if data[0] & 4 and session.ready:
            session.open_stream(b"db")  # a stream of our own for the peer's frames to hit
    stream = data[1:]
    now = 0.0
    for i in range(0, len(stream), step):
        now += 0.01
        session.receive_data(stream[i:i + step], now)
        _check(session)
        session.data_to_send(64 * 1024)
        if session.next_timer() is not None:
            session.handle_timer(now)
        if session.closed:
            break
    session.handle_timer(now + 1000.0)
    _check(session)
    session.data_to_send()


def _check(session: Session) -> None:
    for event in session.pop_events():
        kind = type(event)
        if kind is ConnectionClosed:
            assert event.code != ErrorCode.INTERNAL_ERROR, f"internal error: {event.reason}"
        elif kind is DataReceived:
            session.consume(event.stream_id, len(event.data))  # the application took it


def main() -> None:
    import atheris

    atheris.instrument_all()
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
