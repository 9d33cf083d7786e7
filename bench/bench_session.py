"""In-memory session benchmark: two Sessions wired together move 64 KiB frames.

    python bench/bench_session.py [--seconds 3] [--streams 1 16] [--feed views join]

One process, one core, no sockets: this measures the session and the codec only (framing,
flow control, scheduling, events, credit). The receiver consumes every byte as it arrives.
``--feed views`` hands the sender's buffers to the receiver one by one (zero-copy: headers and
memoryviews of the application's data); ``--feed join`` joins each batch into one bytes
object first, as a socket would (one copy). Set TUNNEL_PURE_PYTHON=1 for the pure codec.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tunnel import codec as frames  # noqa: E402
from tunnel.core.events import DataReceived  # noqa: E402
from tunnel.core.limits import DEFAULT_LIMITS  # noqa: E402
from tunnel.core.session import Session  # noqa: E402
from tunnel.core.session_state import Role  # noqa: E402

KiB = 1024
MiB = 1024 * KiB
FRAME = 64 * KiB
BATCH = 1 * MiB  # bytes per data_to_send, like one SessionLink flush


def run(streams: int, seconds: float, feed: str) -> tuple[float, int]:
    limits = DEFAULT_LIMITS.replace(send_quantum=FRAME)
    sender = Session(Role.AGENT, limits)
    receiver = Session(Role.RELAY, limits)
    for buf in sender.data_to_send():
        receiver.receive_data(buf, 0.0)
    for buf in receiver.data_to_send():
        sender.receive_data(buf, 0.0)
    sender.pop_events()
    receiver.pop_events()
    payload = memoryview(bytes(FRAME))
    ids = [sender.open_stream(b"bench") for _ in range(streams)]
    keep_queued = BATCH  # every batch is full, as in a busy SessionLink flush
    moved = 0
    data_received = DataReceived
    send_data = sender.send_data
    send_buffered = sender.send_buffered
    consume = receiver.consume
    join = b"".join
    start = time.perf_counter()
    deadline = start + seconds
    rounds = 0
    while True:
        for sid in ids:
            while send_buffered(sid) < keep_queued:
                send_data(sid, payload)
        out = sender.data_to_send(BATCH)
        if feed == "join":
            receiver.receive_data(join(out), 0.0)
        else:
            for buf in out:
                receiver.receive_data(buf, 0.0)
        for event in receiver.pop_events():
            if type(event) is data_received:
                n = len(event.data)
                moved += n
                consume(event.stream_id, n)
        for buf in receiver.data_to_send():
            sender.receive_data(buf, 0.0)
        sender.pop_events()
        rounds += 1
        if rounds % 16 == 0 and time.perf_counter() >= deadline:
            break
    elapsed = time.perf_counter() - start
    assert not sender.closed and not receiver.closed
    return moved / elapsed, moved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--feed", nargs="+", default=["views", "join"], choices=["views", "join"])
    args = parser.parse_args()
    print(f"codec: {frames.IMPLEMENTATION}; frames of {FRAME // KiB} KiB; {args.seconds:g} s per run")
    for feed in args.feed:
        for streams in args.streams:
            rate, moved = run(streams, args.seconds, feed)
            print(f"  {streams:3d} stream{'s' if streams > 1 else ' '}  feed={feed:5s}  "
                  f"{rate / 1e6:9.0f} MB/s  ({moved / MiB:.0f} MiB)")


if __name__ == "__main__":
    main()
