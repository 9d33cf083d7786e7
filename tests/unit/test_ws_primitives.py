"""WebSocket primitives of the codec (RFC 6455): masking, header encode/parse, with the
examples of RFC 6455 section 5.7, error cases, and agreement between both codecs."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers.codecs import both_codecs
from tunnel.wire.errors import ProtocolError

KEY = bytes.fromhex("37fa213d")  # the masking key of RFC 6455 section 5.7




def naive_mask(data: bytes, key: bytes, offset: int = 0) -> bytes:
    return bytes(b ^ key[(i + offset) % 4] for i, b in enumerate(data))


# --- RFC 6455 section 5.7 ----------------------------------------------------------------------

RFC_EXAMPLES = [
    # (name, wire, (fin, opcode, length, key, header size), payload as sent on the wire)
    ("unmasked_text_hello", bytes.fromhex("810548656c6c6f"), (True, 1, 5, None, 2), b"Hello"),
    ("masked_text_hello", bytes.fromhex("818537fa213d7f9f4d5158"), (True, 1, 5, KEY, 6),
     bytes.fromhex("7f9f4d5158")),
    ("fragment_1", bytes.fromhex("010348656c"), (False, 1, 3, None, 2), b"Hel"),
    ("fragment_2", bytes.fromhex("80026c6f"), (True, 0, 2, None, 2), b"lo"),
    ("unmasked_ping", bytes.fromhex("890548656c6c6f"), (True, 9, 5, None, 2), b"Hello"),
    ("masked_pong", bytes.fromhex("8a8537fa213d7f9f4d5158"), (True, 10, 5, KEY, 6),
     bytes.fromhex("7f9f4d5158")),
    ("binary_256", bytes.fromhex("827e0100") + bytes(256), (True, 2, 256, None, 4), bytes(256)),
    ("binary_64k", bytes.fromhex("827f0000000000010000") + bytes(65536), (True, 2, 65536, None, 10),
     bytes(65536)),
]


@pytest.mark.parametrize("name,wire,header,payload", RFC_EXAMPLES, ids=[e[0] for e in RFC_EXAMPLES])
def test_rfc_examples_parse(codec, name, wire, header, payload):
    assert codec.parse_ws_header(wire) == header
    size = header[4]
    assert wire[size:] == payload
    # Every strict prefix of the header is incomplete.
    for cut in range(size):
        assert codec.parse_ws_header(wire[:cut]) is None
    # Same answer at an offset, and from a memoryview or bytearray.
    assert codec.parse_ws_header(b"junk" + wire, 4) == header
    assert codec.parse_ws_header(memoryview(wire)) == header
    assert codec.parse_ws_header(bytearray(wire)) == header


@pytest.mark.parametrize("name,wire,header,payload", RFC_EXAMPLES, ids=[e[0] for e in RFC_EXAMPLES])
def test_rfc_examples_encode(codec, name, wire, header, payload):
    fin, opcode, length, key, size = header
    assert codec.encode_ws_header(opcode, fin, length, key) == wire[:size]


def test_rfc_masked_hello(codec):
    assert codec.ws_mask(b"Hello", KEY) == bytes.fromhex("7f9f4d5158")
    assert codec.ws_mask(bytes.fromhex("7f9f4d5158"), KEY) == b"Hello"
    assert codec.ws_mask_join([b"He", b"", b"llo"], KEY) == bytes.fromhex("7f9f4d5158")


# --- headers -------------------------------------------------------------------------------------

@pytest.mark.parametrize("length,form", [
    (0, "00"), (125, "7d"), (126, "7e007e"), (65535, "7effff"), (65536, "7f0000000000010000"),
    (2**32, "7f0000000100000000"), (2**63 - 1, "7f7fffffffffffffff"),
])
def test_length_forms(codec, length, form):
    assert codec.encode_ws_header(2, True, length) == bytes.fromhex("82" + form)
    assert codec.encode_ws_header(2, False, length) == bytes.fromhex("02" + form)
    masked = codec.encode_ws_header(2, True, length, KEY)
    assert masked[1] & 0x80 and masked.endswith(KEY)
    assert codec.parse_ws_header(bytes.fromhex("82" + form)) == (True, 2, length, None, len(form) // 2 + 1)
    assert codec.parse_ws_header(masked) == (True, 2, length, KEY, len(form) // 2 + 5)


@pytest.mark.parametrize("name,wire", [
    ("rsv1", "c100"), ("rsv2", "a100"), ("rsv3", "9100"),
    ("control_too_long", "897e007e"), ("control_126", "887e0080"),
    ("fragmented_ping", "0900"), ("fragmented_close", "0800"),
    ("length_top_bit", "827f8000000000000000"),
])
def test_header_errors(codec, name, wire):
    with pytest.raises(ProtocolError):
        codec.parse_ws_header(bytes.fromhex(wire))


def test_header_edge_cases(codec):
    assert codec.parse_ws_header(b"") is None
    assert codec.parse_ws_header(b"\x81") is None
    assert codec.parse_ws_header(b"\x81\x05", 5) is None  # offset past the end
    assert codec.parse_ws_header(bytes.fromhex("897d")) == (True, 9, 125, None, 2)  # longest control
    assert codec.parse_ws_header(bytes.fromhex("8a80") + KEY) == (True, 10, 0, KEY, 6)
    assert codec.parse_ws_header(bytes.fromhex("8a80") + KEY[:3]) is None  # key incomplete


def test_encode_header_out_of_range(codec):
    with pytest.raises(struct.error):
        codec.encode_ws_header(2, True, -1)
    with pytest.raises(struct.error):
        codec.encode_ws_header(2, True, 2**64)
    with pytest.raises(struct.error):
        codec.encode_ws_header(256, True, 0)


# --- masking -------------------------------------------------------------------------------------

def test_mask_all_offsets_and_lengths(codec):
    key = bytes.fromhex("a1b2c3d4")
    data = bytes(range(256)) * 2
    for length in list(range(0, 70)) + [255, 256, 257, 511]:
        chunk = data[:length]
        for offset in range(-5, 9):
            masked = codec.ws_mask(chunk, key, offset)
            assert type(masked) is bytes
            assert masked == naive_mask(chunk, key, offset % 4), (length, offset)
            assert codec.ws_mask(masked, key, offset) == chunk


def test_mask_start_inside_a_buffer(codec):
    """Masking a message in pieces: the offset continues the key phase."""
    key = bytes.fromhex("01020304")
    data = bytes(range(200))
    whole = codec.ws_mask(data, key)
    for cut in range(0, 200, 7):
        assert codec.ws_mask(data[:cut], key, 0) + codec.ws_mask(data[cut:], key, cut) == whole
        view = memoryview(bytearray(data))[cut:]
        assert codec.ws_mask(view, key, cut) == whole[cut:]


def test_mask_join(codec):
    key = bytes.fromhex("deadbeef")
    parts = [b"a", b"", bytearray(b"bcdefghij"), memoryview(b"klmnopqrstuvwxyz0123456789")[3:], b"!" * 100]
    joined = b"".join(parts)
    assert codec.ws_mask_join(parts, key) == naive_mask(joined, key)
    assert codec.ws_mask_join(iter(parts), key) == naive_mask(joined, key)
    assert codec.ws_mask_join(tuple(parts), key) == naive_mask(joined, key)
    assert codec.ws_mask_join([], key) == b""
    assert type(codec.ws_mask_join([b"x"], key)) is bytes


def test_mask_errors(codec):
    for bad in (b"", b"abc", b"abcde"):
        with pytest.raises(ValueError):
            codec.ws_mask(b"data", bad)
        with pytest.raises(ValueError):
            codec.ws_mask(b"", bad)
        with pytest.raises(ValueError):
            codec.ws_mask_join([b"data"], bad)
    with pytest.raises(TypeError):
        codec.ws_mask_join([b"ok", "text"], KEY)
    with pytest.raises(TypeError):
        codec.ws_mask_join(5, KEY)


# --- hypothesis: agreement and round trips -------------------------------------------------------

@given(st.binary(max_size=300), st.binary(min_size=4, max_size=4), st.integers(-10, 2**40))
def test_mask_round_trip_and_agreement(data, key, offset):
    cy, py = both_codecs()
    masked = cy.ws_mask(data, key, offset)
    assert masked == py.ws_mask(data, key, offset) == naive_mask(data, key, offset % 4)
    assert cy.ws_mask(masked, key, offset) == data


@given(st.lists(st.binary(max_size=40), max_size=8), st.binary(min_size=4, max_size=4))
def test_mask_join_agreement(parts, key):
    cy, py = both_codecs()
    assert cy.ws_mask_join(parts, key) == py.ws_mask_join(parts, key) == naive_mask(b"".join(parts), key)


@given(st.binary(max_size=20), st.integers(-3, 25))
def test_parse_header_agreement(buf, offset):
    cy, py = both_codecs()

    def outcome(codec):
        try:
            return ("ok", codec.parse_ws_header(buf, offset))
        except Exception as exc:  # noqa: BLE001 - a negative offset is a ValueError in both
            return ("error", type(exc), str(exc))

    assert outcome(cy) == outcome(py)


@given(st.integers(0, 255), st.booleans(), st.integers(0, 2**63 - 1),
       st.one_of(st.none(), st.binary(min_size=4, max_size=4)))
def test_header_round_trip(opcode, fin, length, key):
    cy, py = both_codecs()
    wire = cy.encode_ws_header(opcode, fin, length, key)
    assert wire == py.encode_ws_header(opcode, fin, length, key)
    if opcode & 0x70 or (opcode & 0x0F >= 8 and (length > 125 or not fin)):
        return  # not a valid header to parse back
    fin_bit = bool(fin or opcode & 0x80)
    assert cy.parse_ws_header(wire + b"tail") == (fin_bit, opcode & 0x0F, length, key, len(wire))


def test_mask_join_releases_buffers_on_error(codec):
    held = bytearray(b"abc")
    with pytest.raises(TypeError):
        codec.ws_mask_join([held, memoryview(held), 42], KEY)
    held.extend(b"d")  # BufferError if an export were still held
    assert codec.ws_mask_join([held], KEY) == naive_mask(b"abcd", KEY)
    held.extend(b"e")
