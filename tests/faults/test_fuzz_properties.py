"""The fuzz harnesses' properties (fuzz/), run by hypothesis in the normal test run: any
input to the frame decoders, the WebSocket layer and the Session is accepted or refused
with a documented ProtocolError, never a crash or an INTERNAL_ERROR."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel import codec as frames
from tunnel.wire.constants import FrameType

FUZZ = Path(__file__).resolve().parents[2] / "fuzz"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"fuzz_{name}", FUZZ / f"fuzz_{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


decoder = _load("decoder")
session = _load("session")

# Raw bytes, and byte strings assembled from well-formed frames with a twist, so that
# examples get past the header checks.
_frame = st.builds(
    lambda t, f, sid, payload: frames.encode_header(t, f, sid, len(payload)) + payload,
    st.sampled_from(list(FrameType)), st.sampled_from([0, 1, 2]), st.integers(0, 9), st.binary(max_size=64))
_inputs = st.one_of(st.binary(max_size=512),
                    st.tuples(st.integers(0, 255), st.lists(_frame, max_size=12)).map(
                        lambda t: bytes([t[0]]) + b"".join(t[1])))


@settings(max_examples=300)
@given(_inputs)
def test_decoders_accept_or_raise_protocol_error(data):
    decoder.one_input(data)


@settings(max_examples=300)
@given(_inputs)
def test_session_never_fails_internally(data):
    session.one_input(data)
