"""Frame codec: byte vectors both ways (written by hand from docs/PROTOCOL.md), splitting,
zero-copy, header checks, and agreement between the Cython codec and its pure-Python twin."""

from __future__ import annotations

import os
import struct
import time
import tracemalloc

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers.codecs import both_codecs, load_codec
from tunnel.wire.constants import ALLOWED_FLAGS, PARTIAL, ErrorCode, Flags, FrameType
from tunnel.wire.errors import FrameTooLarge, ProtocolError

KiB = 1024
MAX = 256 * KiB



# (name, (type, flags, stream id, payload), wire bytes written by hand from docs/PROTOCOL.md)
VECTORS = [
    ("data_fin", (0, 0x01, 1, b"hi"),
     bytes.fromhex("00 01 0000 00000001 00000002") + b"hi"),
    ("data_empty_fin", (0, 0x01, 0xFFFFFFFF, b""),
     bytes.fromhex("00 01 0000 ffffffff 00000000")),
    ("data_plain", (0, 0x00, 0x01020304, b"\x00\xff"),
     bytes.fromhex("00 00 0000 01020304 00000002 00ff")),
    ("open", (1, 0x00, 2, b"db"),
     bytes.fromhex("01 00 0000 00000002 00000002") + b"db"),
    ("open_fin", (1, 0x01, 4, b"web"),
     bytes.fromhex("01 01 0000 00000004 00000003") + b"web"),
    ("reset", (2, 0x00, 5, bytes.fromhex("00000008")),
     bytes.fromhex("02 00 0000 00000005 00000004 00000008")),
    ("window_update", (3, 0x00, 0, bytes.fromhex("00010000")),
     bytes.fromhex("03 00 0000 00000000 00000004 00010000")),
    ("ping", (4, 0x00, 0, bytes.fromhex("0102030405060708")),
     bytes.fromhex("04 00 0000 00000000 00000008 0102030405060708")),
    ("ping_ack", (4, 0x02, 0, bytes.fromhex("0102030405060708")),
     bytes.fromhex("04 02 0000 00000000 00000008 0102030405060708")),
    ("goaway", (5, 0x00, 0, bytes.fromhex("00000007 00000001") + b"bye"),
     bytes.fromhex("05 00 0000 00000000 0000000b 00000007 00000001") + b"bye"),
    ("hello", (6, 0x00, 0, bytes.fromhex("01 01 0000 00800000 04000000 00040000 00002000")),
     bytes.fromhex("06 00 0000 00000000 00000014 0101 0000 00800000 04000000 00040000 00002000")),
    ("control", (7, 0x00, 0, b'{"type":"auth"}'),
     bytes.fromhex("07 00 0000 00000000 0000000f") + b'{"type":"auth"}'),
]
ALL_WIRE = b"".join(wire for _, _, wire in VECTORS)
ALL_FRAMES = [frame for _, frame, _ in VECTORS]


def norm(frames):
    """Frames with payloads as bytes."""
    return [(t, f, s, bytes(p)) for t, f, s, p in frames]


def merge(frames):
    """Join the PARTIAL pieces of each DATA frame, checking the piece rules on the way."""
    out = []
    pending = None
    for t, f, s, p in frames:
        p = bytes(p)
        if f & PARTIAL:
            assert t == FrameType.DATA, "PARTIAL on a non-DATA frame"
            assert not f & Flags.FIN, "FIN on a piece that is not the last"
            if pending is None:
                pending = [t, f & ~PARTIAL, s, p]
            else:
                assert pending[2] == s and pending[1] == f & ~PARTIAL
                pending[3] += p
            continue
        if pending is not None:
            assert t == FrameType.DATA and s == pending[2], "a piece run ended by another frame"
            out.append((t, f, s, pending[3] + p))
            pending = None
        else:
            out.append((t, f, s, p))
    assert pending is None, "unfinished PARTIAL run"
    return out


def feed_chunks(codec, chunks, max_frame_size=MAX):
    decoder = codec.FrameDecoder(max_frame_size)
    frames = []
    for chunk in chunks:
        frames.extend(decoder.feed(chunk))
    assert decoder.buffered == 0
    return frames


# --- vectors both ways -------------------------------------------------------------------------

@pytest.mark.parametrize("name,frame,wire", VECTORS, ids=[v[0] for v in VECTORS])
def test_encode_vectors(codec, name, frame, wire):
    t, f, s, payload = frame
    assert codec.encode_frame(t, f, s, payload) == wire
    assert codec.encode_header(t, f, s, len(payload)) + payload == wire


@pytest.mark.parametrize("name,frame,wire", VECTORS, ids=[v[0] for v in VECTORS])
def test_decode_vectors(codec, name, frame, wire):
    decoder = codec.FrameDecoder(MAX)
    frames = decoder.feed(wire)
    assert norm(frames) == [frame]
    assert decoder.buffered == 0
    assert all(type(x) is int for x in frames[0][:3])


def test_payload_helpers_vectors(codec):
    assert codec.encode_u32(8) == bytes.fromhex("00000008")
    assert codec.parse_u32(bytes.fromhex("00010000")) == 65536
    assert codec.parse_u32(memoryview(bytes.fromhex("ffffffff"))) == 2**32 - 1
    hello = bytes.fromhex("01 02 0000 00800000 04000000 00040000 00002000")
    assert codec.HELLO_SIZE == 20
    assert codec.encode_hello(1, 2, 8 * 2**20, 64 * 2**20, MAX, 8192) == hello
    assert codec.parse_hello(hello) == (1, 2, 8 * 2**20, 64 * 2**20, MAX, 8192)
    assert codec.parse_hello(hello + b"future") == (1, 2, 8 * 2**20, 64 * 2**20, MAX, 8192)
    assert codec.parse_hello(memoryview(bytearray(hello))) == (1, 2, 8 * 2**20, 64 * 2**20, MAX, 8192)
    goaway = bytes.fromhex("00000007 0000000c") + "déjà".encode()
    assert codec.encode_goaway(7, ErrorCode.VERSION_MISMATCH, "déjà") == goaway
    assert codec.parse_goaway(goaway) == (7, 12, "déjà")
    assert codec.encode_goaway(1, 0) == bytes.fromhex("00000001 00000000")
    assert codec.parse_goaway(bytes.fromhex("00000001 00000000")) == (1, 0, "")


def test_payload_helper_errors(codec):
    for bad in (b"", b"\0" * 3, b"\0" * 5):
        with pytest.raises(ProtocolError):
            codec.parse_u32(bad)
        with pytest.raises(ProtocolError):
            codec.parse_u32(memoryview(bad))
    with pytest.raises(ProtocolError):
        codec.parse_hello(b"\0" * 19)
    for size in (0, 7, 8 + 1025):
        with pytest.raises(ProtocolError):
            codec.parse_goaway(b"\0" * size)
    assert codec.parse_goaway(b"\0" * 8 + b"x" * 1024)[2] == "x" * 1024
    # The reason is cut to 1024 bytes when encoding; bad UTF-8 is replaced when parsing.
    assert len(codec.encode_goaway(1, 0, "é" * 1000)) == 8 + 1024
    assert codec.parse_goaway(b"\0" * 8 + b"ok\xff")[2] == "ok\ufffd"


def test_encode_accepts_enums_and_rejects_out_of_range(codec):
    assert codec.encode_header(FrameType.PING, Flags.ACK, 0, 8) == bytes.fromhex("04 02 0000 00000000 00000008")
    for args in ((256, 0, 0, 0), (0, -1, 0, 0), (0, 0, 2**32, 0), (0, 0, 0, -1), (0, 0, 0, 2**32)):
        with pytest.raises(struct.error):
            codec.encode_header(*args)
    with pytest.raises(struct.error):
        codec.encode_frame(0, 0, -1, b"x")
    with pytest.raises(struct.error):
        codec.encode_u32(2**32)
    with pytest.raises(struct.error):
        codec.encode_hello(256, 1, 1, 1, 1, 1)
    with pytest.raises(struct.error):
        codec.encode_goaway(2**32, 0)


def test_encode_frame_payload_types(codec):
    wire = bytes.fromhex("07 00 0000 00000000 00000002") + b"{}"
    assert codec.encode_frame(7, 0, 0, b"{}") == wire
    assert codec.encode_frame(7, 0, 0, bytearray(b"{}")) == wire
    assert codec.encode_frame(7, 0, 0, memoryview(b"{}")) == wire
    assert codec.encode_frame(0, 1, 9) == bytes.fromhex("00 01 0000 00000009 00000000")


# --- the compiled codec is the one in use --------------------------------------------------------

def test_compiled_codec_is_in_use():
    """CI builds the extension: the pure twin may only be in use when explicitly forced."""
    import tunnel
    import tunnel.codec

    if tunnel.PURE_PYTHON:
        pytest.skip("TUNNEL_PURE_PYTHON forces the pure-Python codec")

    assert tunnel.codec.IMPLEMENTATION == "cython", (
        "tunnel._frames is not built: run `pip install -e .` or `python setup.py build_ext --inplace`"
    )


def test_implementation_names(codec):
    assert codec.IMPLEMENTATION == ("cython" if codec.__name__ == "tunnel._frames" else "python")


# --- splitting -----------------------------------------------------------------------------------

def test_every_two_way_split(codec):
    for cut in range(len(ALL_WIRE) + 1):
        assert merge(feed_chunks(codec, [ALL_WIRE[:cut], ALL_WIRE[cut:]])) == ALL_FRAMES, cut


def test_byte_at_a_time(codec):
    chunks = [ALL_WIRE[i:i + 1] for i in range(len(ALL_WIRE))]
    assert merge(feed_chunks(codec, chunks)) == ALL_FRAMES


def test_byte_at_a_time_pieces(codec):
    """DATA spanning chunks: one piece per byte, PARTIAL and no FIN on all but the last."""
    wire = codec.encode_frame(0, 1, 3, b"abc")
    frames = norm(feed_chunks(codec, [wire[i:i + 1] for i in range(len(wire))]))
    assert frames == [(0, PARTIAL, 3, b"a"), (0, PARTIAL, 3, b"b"), (0, 1, 3, b"c")]


def test_empty_chunks_change_nothing(codec):
    decoder = codec.FrameDecoder(MAX)
    assert decoder.feed(b"") == []
    assert norm(decoder.feed(ALL_WIRE[:5])) == []
    assert decoder.buffered == 5
    assert decoder.feed(b"") == []
    assert decoder.buffered == 5
    assert merge(decoder.feed(ALL_WIRE[5:])) == ALL_FRAMES


@given(st.data())
def test_any_split_decodes_the_same(data):
    codecs = [c for c in (load_codec("cython"), load_codec("python")) if c is not None]
    frames = data.draw(st.lists(valid_frames(), max_size=8))
    wire = b"".join(codecs[-1].encode_frame(*f) for f in frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=12)))
    chunks = [wire[a:b] for a, b in zip([0] + cuts, cuts + [len(wire)])]
    for codec in codecs:
        assert merge(feed_chunks(codec, chunks)) == [(t, f, s, bytes(p)) for t, f, s, p in frames]


# --- zero copy and buffering ---------------------------------------------------------------------

def test_payloads_inside_a_chunk_are_views_of_it(codec):
    chunk = bytearray(codec.encode_frame(0, 0, 1, b"abcd") + codec.encode_frame(7, 0, 0, b"{}"))
    frames = codec.FrameDecoder(MAX).feed(chunk)
    for _, _, _, payload in frames:
        assert isinstance(payload, memoryview)
        assert payload.obj is chunk
    chunk[12] = ord("X")
    assert bytes(frames[0][3]) == b"Xbcd"
    frames = None  # release the exports


def test_memoryview_input_slices_the_same_buffer(codec):
    base = bytearray(b"..." + codec.encode_frame(0, 1, 7, b"xyz"))
    frames = codec.FrameDecoder(MAX).feed(memoryview(base)[3:])
    assert norm(frames) == [(0, 1, 7, b"xyz")]
    assert frames[0][3].obj is base


def test_non_byte_buffer_formats_are_cast(codec):
    import array

    wire = codec.encode_frame(4, 0, 0, b"\1\2\3\4\5\6\7\x08")
    arr = array.array("I", wire)  # 20 bytes, itemsize 4
    assert norm(codec.FrameDecoder(MAX).feed(arr)) == [(4, 0, 0, b"\1\2\3\4\5\6\7\x08")]
    assert norm(codec.FrameDecoder(MAX).feed(memoryview(arr))) == [(4, 0, 0, b"\1\2\3\4\5\6\7\x08")]


def test_control_payload_spanning_chunks_is_assembled_once(codec):
    payload = bytes(range(256)) * 4
    wire = codec.encode_frame(7, 0, 0, payload)
    decoder = codec.FrameDecoder(MAX)
    assert decoder.feed(wire[:100]) == []
    assert decoder.buffered == 88
    assert decoder.feed(wire[100:600]) == []
    assert decoder.buffered == 588
    frames = decoder.feed(wire[600:])
    assert decoder.buffered == 0
    assert len(frames) == 1 and type(frames[0][3]) is bytes and frames[0][3] == payload


def test_data_spanning_chunks_is_not_buffered(codec):
    wire = codec.encode_frame(0, 1, 5, b"x" * 1000)
    decoder = codec.FrameDecoder(MAX)
    first = decoder.feed(wire[:500])
    assert norm(first) == [(0, PARTIAL, 5, b"x" * 488)]
    assert decoder.buffered == 0
    assert norm(decoder.feed(wire[500:])) == [(0, 1, 5, b"x" * 512)]


def test_header_split_is_buffered(codec):
    decoder = codec.FrameDecoder(MAX)
    wire = codec.encode_frame(4, 2, 0, b"12345678")
    for i in range(11):
        assert decoder.feed(wire[i:i + 1]) == []
        assert decoder.buffered == i + 1
    assert decoder.feed(wire[11:12]) == []
    assert decoder.buffered == 0
    assert norm(decoder.feed(wire[12:])) == [(4, 2, 0, b"12345678")]


def test_zero_length_frames(codec):
    wire = codec.encode_frame(0, 1, 1) + codec.encode_frame(1, 0, 3) + codec.encode_frame(7, 0, 0)
    assert norm(feed_chunks(codec, [wire])) == [(0, 1, 1, b""), (1, 0, 3, b""), (7, 0, 0, b"")]
    assert merge(feed_chunks(codec, [wire[i:i + 1] for i in range(len(wire))])) == [
        (0, 1, 1, b""), (1, 0, 3, b""), (7, 0, 0, b"")]


def test_max_frame_size_boundary_and_change(codec):
    decoder = codec.FrameDecoder(16)
    assert decoder.max_frame_size == 16
    assert norm(decoder.feed(codec.encode_frame(7, 0, 0, b"x" * 16))) == [(7, 0, 0, b"x" * 16)]
    decoder.max_frame_size = 17
    assert decoder.max_frame_size == 17
    assert len(decoder.feed(codec.encode_frame(7, 0, 0, b"x" * 17))) == 1
    with pytest.raises(FrameTooLarge):
        decoder.feed(codec.encode_header(7, 0, 0, 18))
    zero = codec.FrameDecoder(0)
    assert norm(zero.feed(codec.encode_frame(0, 1, 1))) == [(0, 1, 1, b"")]
    with pytest.raises(FrameTooLarge):
        zero.feed(codec.encode_header(0, 0, 1, 1))


# --- header checks ---------------------------------------------------------------------------------

BAD_HEADERS = [
    ("unknown_type", bytes.fromhex("08 00 0000 00000000 00000000"), ProtocolError),
    ("type_ff", bytes.fromhex("ff 00 0000 00000000 00000000"), ProtocolError),
    ("reserved_hi", bytes.fromhex("00 00 8000 00000001 00000000"), ProtocolError),
    ("reserved_lo", bytes.fromhex("04 00 0001 00000000 00000008"), ProtocolError),
    ("ack_on_data", bytes.fromhex("00 02 0000 00000001 00000000"), ProtocolError),
    ("fin_on_reset", bytes.fromhex("02 01 0000 00000001 00000004"), ProtocolError),
    ("fin_on_ping", bytes.fromhex("04 01 0000 00000000 00000008"), ProtocolError),
    ("undefined_flag", bytes.fromhex("00 04 0000 00000001 00000000"), ProtocolError),
    ("flag_on_hello", bytes.fromhex("06 80 0000 00000000 00000014"), ProtocolError),
    ("too_large", bytes.fromhex("00 00 0000 00000001 00040001"), FrameTooLarge),
    ("too_large_control", bytes.fromhex("07 00 0000 00000000 00040001"), FrameTooLarge),
    ("max_length", bytes.fromhex("07 00 0000 00000000 ffffffff"), FrameTooLarge),
]


@pytest.mark.parametrize("name,header,exc", BAD_HEADERS, ids=[b[0] for b in BAD_HEADERS])
def test_bad_headers(codec, name, header, exc):
    for chunks in ([header], [header[:5], header[5:]], [header[i:i + 1] for i in range(12)]):
        decoder = codec.FrameDecoder(MAX)
        with pytest.raises(ProtocolError) as info:
            for chunk in chunks:
                decoder.feed(chunk)
        assert type(info.value) is exc
        assert info.value.code == (ErrorCode.FRAME_SIZE_ERROR if exc is FrameTooLarge else ErrorCode.PROTOCOL_ERROR)
        # After an error the decoder refuses everything, even valid input.
        with pytest.raises(ProtocolError):
            decoder.feed(codec.encode_frame(4, 0, 0, b"12345678"))
        with pytest.raises(ProtocolError):
            decoder.feed(b"")


def test_error_after_good_frames_in_one_chunk(codec):
    decoder = codec.FrameDecoder(MAX)
    with pytest.raises(ProtocolError):
        decoder.feed(codec.encode_frame(4, 0, 0, b"12345678") + bytes.fromhex("09 00 0000 00000000 00000000"))


def test_oversized_length_is_refused_without_allocating(codec):
    header = codec.encode_header(FrameType.CONTROL, 0, 0, 2**32 - 1)
    decoder = codec.FrameDecoder(MAX)
    tracemalloc.start()
    try:
        started = time.perf_counter()
        with pytest.raises(FrameTooLarge):
            decoder.feed(header + b"x" * 100)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * KiB, peak
    assert elapsed < 1.0
    assert decoder.buffered == 0


def test_allowed_flags_table(codec):
    """Every (type, flags) pair: accepted exactly when docs/PROTOCOL.md allows the flags."""
    for ftype in FrameType:
        for flags in range(256):
            decoder = codec.FrameDecoder(MAX)
            header = bytes([ftype, flags, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0])
            if flags & ~int(ALLOWED_FLAGS[ftype]):
                with pytest.raises(ProtocolError):
                    decoder.feed(header)
            else:
                assert norm(decoder.feed(header)) == [(int(ftype), flags, 1, b"")]


# --- hypothesis: both codecs agree on every input ------------------------------------------------

def valid_frames():
    def build(ftype, flag_bits, sid, payload):
        return (int(ftype), flag_bits & int(ALLOWED_FLAGS[ftype]), sid, payload)

    return st.builds(
        build,
        st.sampled_from(list(FrameType)),
        st.integers(0, 255),
        st.integers(0, 2**32 - 1),
        st.binary(max_size=300),
    )


def run(codec, chunks, max_frame_size):
    """What a decoder does with ``chunks``: per chunk the frames (payload bytes and type) and
    ``buffered``, or the exception class and message, then whether it refuses more input."""
    decoder = codec.FrameDecoder(max_frame_size)
    trace = []
    for chunk in chunks:
        try:
            frames = decoder.feed(chunk)
        except ProtocolError as exc:
            trace.append(("error", type(exc), str(exc), exc.code))
            try:
                decoder.feed(b"")
            except ProtocolError as again:
                trace.append(("refused", type(again)))
            break
        trace.append(("ok", [(t, f, s, bytes(p), type(p)) for t, f, s, p in frames], decoder.buffered))
    return trace


def split(data, wire):
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10), label="cuts"))
    return [wire[a:b] for a, b in zip([0] + cuts, cuts + [len(wire)])]




def agree(chunks, max_frame_size):
    cy, py = both_codecs()
    expected = run(py, chunks, max_frame_size)
    assert run(cy, chunks, max_frame_size) == expected
    if expected and expected[-1][0] == "refused":
        assert issubclass(expected[-2][1], ProtocolError)
    return expected


MAX_SIZES = st.one_of(
    st.sampled_from([MAX, 0, 16, 16 * KiB, 2**24]),
    st.integers(-1, 2**32 + 1),
    st.integers(0, 400),
)


@given(st.data(), st.binary(max_size=600), MAX_SIZES)
def test_agree_on_random_bytes(data, wire, max_frame_size):
    agree(split(data, wire), max_frame_size)


@given(st.data(), st.lists(valid_frames(), max_size=10), MAX_SIZES)
def test_agree_on_valid_streams(data, frames, max_frame_size):
    _, py = both_codecs()
    wire = b"".join(py.encode_frame(*f) for f in frames)
    trace = agree(split(data, wire), max_frame_size)
    if all(len(f[3]) <= max_frame_size for f in frames):
        decoded = [frame for step in trace for frame in step[1]]
        assert merge([f[:4] for f in decoded]) == [(t, f, s, bytes(p)) for t, f, s, p in frames]


@given(st.data(), st.lists(valid_frames(), min_size=1, max_size=8), MAX_SIZES)
def test_agree_on_mutated_streams(data, frames, max_frame_size):
    _, py = both_codecs()
    wire = bytearray(b"".join(py.encode_frame(*f) for f in frames))
    for _ in range(data.draw(st.integers(1, 6), label="mutations")):
        kind = data.draw(st.sampled_from(["flip", "set", "cut", "insert"]), label="kind")
        pos = data.draw(st.integers(0, max(len(wire) - 1, 0)), label="pos")
        if kind == "flip" and wire:
            wire[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "set" and wire:
            wire[pos] = data.draw(st.integers(0, 255))
        elif kind == "cut":
            del wire[pos:pos + data.draw(st.integers(1, 16))]
        else:
            wire[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
    agree(split(data, bytes(wire)), max_frame_size)


@given(st.lists(st.one_of(st.integers(-2, 2**32 + 2), st.integers(0, 300)), min_size=4, max_size=4),
       st.binary(max_size=40))
def test_agree_on_encoders(ints, payload):
    cy, py = both_codecs()

    def outcome(fn, *args):
        try:
            return ("ok", fn(*args))
        except Exception as exc:  # noqa: BLE001 - the class is what is compared
            return ("error", type(exc))

    a, b, c, d = ints
    for name, args in (
        ("encode_header", (a, b, c, d)),
        ("encode_frame", (a, b, c, payload)),
        ("encode_u32", (a,)),
        ("encode_hello", (a, b, c, d, a, b)),
        ("encode_goaway", (a, b, payload.decode("latin-1"))),
        ("parse_u32", (payload,)),
        ("parse_hello", (payload,)),
        ("parse_goaway", (payload,)),
    ):
        assert outcome(getattr(cy, name), *args) == outcome(getattr(py, name), *args), name


def test_no_buffer_export_outlives_a_failed_feed(codec):
    """A bytearray fed to a decoder that then raises can be resized again afterwards."""
    chunk = bytearray(codec.encode_frame(4, 0, 0, b"12345678") + bytes.fromhex("09 00 0000 00000000 00000000"))
    with pytest.raises(ProtocolError):
        codec.FrameDecoder(MAX).feed(chunk)
    chunk.extend(b"more")  # BufferError if a view were still held
    ok = bytearray(codec.encode_frame(4, 0, 0, b"12345678"))
    frames = codec.FrameDecoder(MAX).feed(ok)
    with pytest.raises(BufferError):
        ok.extend(b"x")  # the returned payload view still points into it
    del frames
    ok.extend(b"x")

