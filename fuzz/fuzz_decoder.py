"""Atheris harness: the frame decoders (compiled and pure-Python twin) and the WebSocket
frame layer.

Property: any input, split anywhere, is either decoded or raises ``ProtocolError`` (the
documented error, see tunnel/wire/errors.py); both codecs agree on the frames and on the error;
the WebSocket layer never raises for peer input (it records ``failure`` and closes).

    python3 fuzz/fuzz_decoder.py -max_total_time=60      # see fuzz/README.md
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tunnel.carriers.websocket import WebSocketConnection  # noqa: E402
from tunnel.codec import pure as _frames_py  # noqa: E402
from tunnel.wire.errors import ProtocolError  # noqa: E402

try:
    from tunnel import _frames as _compiled
except ImportError:  # pragma: no cover - not built: fuzz the twin alone
    _compiled = None

MAX_FRAME = 16 * 1024


def _decode(codec, chunks: list[bytes]):
    decoder = codec.FrameDecoder(MAX_FRAME)
    out = []
    try:
        for chunk in chunks:
            for ftype, flags, sid, payload in decoder.feed(chunk):
                out.append((ftype, flags, sid, bytes(payload)))
    except ProtocolError as exc:
        return out, (type(exc).__name__, int(exc.code))
    return out, None


def _merge(frames):
    """DATA may arrive in pieces (PARTIAL flag): join them to compare codecs."""
    merged = []
    for ftype, flags, sid, payload in frames:
        if merged and merged[-1][0] == 0 and merged[-1][1] & 0x100 and ftype == 0 and sid == merged[-1][2]:
            _, _, _, prev = merged.pop()
            merged.append((ftype, flags, sid, prev + payload))
        else:
            merged.append((ftype, flags, sid, payload))
    return merged


def one_input(data: bytes) -> None:
    if not data:
        return
    # First byte picks the split points: the same bytes fed in pieces must decode the same.
    step = data[0] % 17 + 1
    body = data[1:]
    chunks = [body[i:i + step] for i in range(0, len(body), step)] or [b""]
    py_frames, py_err = _decode(_frames_py, chunks)
    whole_frames, whole_err = _decode(_frames_py, [body])
    assert _merge(py_frames) == _merge(whole_frames) or py_err or whole_err
    assert (py_err is None) == (whole_err is None), (py_err, whole_err)
    if _compiled is not None:
        c_frames, c_err = _decode(_compiled, chunks)
        assert _merge(c_frames) == _merge(py_frames), "codecs disagree on frames"
        assert c_err == py_err, (c_err, py_err)
    for client in (False, True):
        ws = WebSocketConnection(client, 64 * 1024)
        for chunk in chunks:
            ws.receive_data(chunk)  # must never raise
            ws.data_to_send()


def main() -> None:
    import atheris

    atheris.instrument_all()
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
