"""Inputs off the compiled codec's fast paths: other buffer types, integers out of range or of
other types, odd keys and offsets. The compiled codec handles them itself with the twin's rules
(integers through the same ``struct`` formats, buffers read as their bytes, TypeError for a
non-buffer), so both codecs give the same result or raise the same exception, message included.
Also: the compiled codec imports on its own, without its twin."""

from __future__ import annotations

import array
import mmap
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

KEY = bytes.fromhex("37fa213d")
ROOT = Path(__file__).resolve().parents[2]


class Bytes(bytes):
    pass


class ByteArray(bytearray):
    pass


class Index:
    """An integer-like object (as numpy's integers): usable wherever ``operator.index`` is."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value


class Like:
    """Expected: the same result as the call with these (plain) arguments."""

    def __init__(self, *args) -> None:
        self.args = args


def other_buffers(raw: bytes) -> dict:
    """Buffers holding ``raw`` that are not bytes, bytearray or a 1-D ``'B'`` memoryview."""
    return {
        "bytes_subclass": lambda: Bytes(raw),
        "bytearray_subclass": lambda: ByteArray(raw),
        "memoryview_b": lambda: memoryview(raw).cast("b"),
        "memoryview_c": lambda: memoryview(raw).cast("c"),
        "memoryview_2d": lambda: memoryview(raw).cast("B", (2, len(raw) // 2)),
        "array_H": lambda: array.array("H", raw),
    }


NOT_BUFFERS = {
    "non_contiguous": lambda: memoryview(bytes(16))[::2],
    "str": lambda: "abcd",
    "list": lambda: [1, 2, 3, 4],
    "int": lambda: 4,
    "none": lambda: None,
}

HELLO = bytes(range(1, 21))
GOAWAY = bytes.fromhex("00000007 0000000c") + b"ok"
WS_HEADER = bytes.fromhex("8285") + KEY

#: (function, how to call it with a buffer ``b``, the buffer's bytes)
BUFFER_ARGUMENTS = [
    ("parse_u32", lambda b: (b,), b"\x00\x01\x02\x03"),
    ("parse_hello", lambda b: (b,), HELLO),
    ("parse_goaway", lambda b: (b,), GOAWAY),
    ("encode_frame", lambda b: (7, 0, 1, b), b"payload!"),
    ("ws_mask", lambda b: (b, KEY, 1), b"masked"),
    ("ws_mask", lambda b: (b"payload", b, 1), KEY),
    ("ws_mask_join", lambda b: ([b"pay", b"load"], b), KEY),
    ("ws_mask_join", lambda b: ([b"pay", b], KEY), b"loaded"),
    ("ws_mask_join_into", lambda b: ([b"payload"], b, bytearray(10)), KEY),
    ("encode_ws_header", lambda b: (2, True, 5, b), KEY),
    ("parse_ws_header", lambda b: (b, 0), WS_HEADER),
]


def buffer_cases():
    for name, call, raw in BUFFER_ARGUMENTS:
        for kind, make in other_buffers(raw).items():
            yield f"{name}-{kind}", name, (lambda call=call, make=make: call(make())), Like(*call(raw))
        for kind, make in NOT_BUFFERS.items():
            expected = Like(*call(None)) if name == "encode_ws_header" and kind == "none" else TypeError
            yield f"{name}-{kind}", name, (lambda call=call, make=make: call(make())), expected


def at(args):
    return lambda: args


INT_CASES = [
    # Integers: the twin's struct formats (objects with __index__ accepted, struct.error out of range).
    ("encode_header-index", "encode_header", at((Index(7), 0, 1, 2)), Like(7, 0, 1, 2)),
    ("encode_header-float", "encode_header", at((7.0, 0, 1, 2)), struct.error),
    ("encode_header-none", "encode_header", at((7, None, 1, 2)), struct.error),
    ("encode_header-negative", "encode_header", at((7, 0, 1, -1)), struct.error),
    ("encode_header-huge", "encode_header", at((7, 0, 2**70, 2)), struct.error),
    ("encode_frame-index", "encode_frame", at((7, Index(0), 1, b"x")), Like(7, 0, 1, b"x")),
    ("encode_frame-float", "encode_frame", at((7, 0, 1.0, b"x")), struct.error),
    ("encode_frame-huge", "encode_frame", at((7, 0, 2**32, b"x")), struct.error),
    ("encode_frame-non-buffer-and-bad-int", "encode_frame", at((7, 0, 2**32, "x")), TypeError),
    ("encode_u32-index", "encode_u32", at((Index(5),)), Like(5)),
    ("encode_u32-float", "encode_u32", at((5.0,)), struct.error),
    ("encode_u32-negative", "encode_u32", at((-1,)), struct.error),
    ("encode_u32-huge", "encode_u32", at((2**70,)), struct.error),
    ("encode_hello-index", "encode_hello", at((1, 1, Index(8), 1, 1, 1)), Like(1, 1, 8, 1, 1, 1)),
    ("encode_hello-byte-out-of-range", "encode_hello", at((1, 256, 1, 1, 1, 1)), struct.error),
    ("encode_hello-none", "encode_hello", at((1, 1, 1, 1, None, 1)), struct.error),
    ("encode_goaway-index", "encode_goaway", at((Index(1), 0, "x")), Like(1, 0, "x")),
    ("encode_goaway-huge", "encode_goaway", at((1, 2**32, "x")), struct.error),
    ("encode_goaway-bytes-reason", "encode_goaway", at((1, 0, b"x")), AttributeError),
    # The mask key phase: any integer (or __index__), taken modulo 4.
    ("ws_mask-offset-index", "ws_mask", at((b"payload", KEY, Index(5))), Like(b"payload", KEY, 1)),
    ("ws_mask-offset-bool", "ws_mask", at((b"payload", KEY, True)), Like(b"payload", KEY, 1)),
    ("ws_mask-offset-huge", "ws_mask", at((b"payload", KEY, 2**70 + 3)), Like(b"payload", KEY, 3)),
    ("ws_mask-offset-huge-negative", "ws_mask", at((b"payload", KEY, -2**70 + 1)), Like(b"payload", KEY, 1)),
    ("ws_mask-offset-float", "ws_mask", at((b"payload", KEY, 1.0)), TypeError),
    ("ws_mask-offset-none-empty-data", "ws_mask", at((b"", KEY, None)), TypeError),
    ("ws_mask-key-short", "ws_mask", at((b"payload", Bytes(b"abc"))), ValueError),
    ("ws_mask-key-long-array", "ws_mask", at((b"payload", array.array("H", b"abcdef"))), ValueError),
    ("ws_mask_join-bad-item-before-bad-key", "ws_mask_join", at(([b"ok", "text"], b"abc")), TypeError),
    ("ws_mask_join-bad-key-empty", "ws_mask_join", at(([], bytearray(b"abc"))), ValueError),
    ("ws_mask_join-non-contiguous-item", "ws_mask_join", at(([memoryview(bytes(8))[::2]], KEY)), TypeError),
    ("ws_mask_join_into-bad-key", "ws_mask_join_into", at(([b"data"], memoryview(b"abc"), bytearray(8))), ValueError),
    ("ws_mask_join_into-bad-item-before-bad-key", "ws_mask_join_into", at(([b"ok", 5], b"abc", bytearray(8))), TypeError),
    ("ws_mask_join_into-bad-key-before-bad-out", "ws_mask_join_into", at(([b"data"], b"abc", b"")), ValueError),
    # WebSocket header encoding: struct rules too; a mask key is 4 bytes of any buffer.
    ("encode_ws_header-opcode-index", "encode_ws_header", at((Index(2), True, 5)), Like(2, True, 5)),
    ("encode_ws_header-length-index", "encode_ws_header", at((2, True, Index(300))), Like(2, True, 300)),
    ("encode_ws_header-opcode-float", "encode_ws_header", at((2.0, True, 5)), TypeError),
    ("encode_ws_header-length-none", "encode_ws_header", at((2, True, None)), TypeError),
    ("encode_ws_header-opcode-negative", "encode_ws_header", at((-1, True, 5)), struct.error),
    ("encode_ws_header-opcode-huge", "encode_ws_header", at((2**70, True, 5)), struct.error),
    ("encode_ws_header-length-negative", "encode_ws_header", at((2, True, -1)), struct.error),
    ("encode_ws_header-length-huge", "encode_ws_header", at((2, False, 2**70, KEY)), struct.error),
    ("encode_ws_header-key-short", "encode_ws_header", at((2, True, 5, b"abc")), ValueError),
    ("encode_ws_header-key-short-bad-length", "encode_ws_header", at((2, True, -1, b"abc")), ValueError),
    # Header parsing offsets: any non-negative integer; past the end is "incomplete".
    ("parse_ws_header-offset-index", "parse_ws_header", at((b"junk" + WS_HEADER, Index(4))), Like(WS_HEADER)),
    ("parse_ws_header-offset-bool", "parse_ws_header", at((b"j" + WS_HEADER, True)), Like(WS_HEADER)),
    ("parse_ws_header-offset-huge", "parse_ws_header", at((WS_HEADER, 2**70)), Like(b"")),
    ("parse_ws_header-offset-max", "parse_ws_header", at((WS_HEADER, 2**63 - 1)), Like(b"")),
    ("parse_ws_header-offset-negative", "parse_ws_header", at((WS_HEADER, -1)), ValueError),
    ("parse_ws_header-offset-huge-negative", "parse_ws_header", at((WS_HEADER, -2**70)), ValueError),
    ("parse_ws_header-offset-float", "parse_ws_header", at((WS_HEADER, 1.0)), TypeError),
    ("parse_ws_header-offset-none", "parse_ws_header", at((WS_HEADER, None)), TypeError),
    ("parse_ws_header-non-buffer-and-bad-offset", "parse_ws_header", at(("text", None)), TypeError),
]

CASES = list(buffer_cases()) + INT_CASES


def outcome(fn, args):
    """The result, or the exception's class and message."""
    try:
        return ("ok", fn(*args))
    except Exception as exc:  # noqa: BLE001 - the class and message are what is compared
        return (type(exc), str(exc))


@pytest.mark.parametrize("name,args,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_same_outcome_off_the_fast_paths(codec_pair, name, args, expected):
    compiled, twin = codec_pair
    got = outcome(getattr(compiled, name), args())
    assert got == outcome(getattr(twin, name), args())
    if isinstance(expected, Like):
        assert got == ("ok", getattr(twin, name)(*expected.args))
    else:
        assert got[0] is expected, got


OUTPUTS = {
    # (out, expected outcome kind, bytes of out afterwards when written)
    "bytearray_subclass": (lambda: ByteArray(10), "ok"),
    "array_B": (lambda: array.array("B", bytes(10)), "ok"),
    "array_H": (lambda: array.array("H", bytes(10)), "ok"),
    "memoryview_b_of_bytearray": (lambda: memoryview(bytearray(10)).cast("b"), "ok"),
    "too_small": (lambda: ByteArray(6), ValueError),
    "read_only_bytes": (lambda: bytes(10), TypeError),
    "read_only_view": (lambda: memoryview(bytes(10)).cast("b"), TypeError),
    "non_contiguous": (lambda: memoryview(bytearray(20))[::2], TypeError),
    "list": (lambda: [0] * 10, TypeError),
}


@pytest.mark.parametrize("kind", sorted(OUTPUTS))
@pytest.mark.parametrize("parts", [[b"pay", b"load"], []], ids=["data", "empty"])
def test_mask_join_into_other_outputs(codec_pair, kind, parts):
    """``out`` may be any writable buffer, written as its bytes; errors as in the twin."""
    make, expected = OUTPUTS[kind]
    results = []
    for codec in codec_pair:
        out = make()
        got = outcome(codec.ws_mask_join_into, (parts, KEY, out))
        results.append((got, bytes(memoryview(out).cast("B")) if got[0] == "ok" else None))
    assert results[0] == results[1]
    (got, written) = results[0]
    if expected == "ok":
        data = codec_pair[1].ws_mask_join(parts, KEY)
        assert got == ("ok", len(data)) and written[:len(data)] == data
    elif parts or expected is not ValueError:
        assert got[0] is expected, got


def test_encode_frame_payload_over_4_gib(codec_pair, tmp_path):
    """A payload longer than a u32 length can say: struct.error before anything is copied.
    The 4 GiB payload is a sparse file mapped read-only: no memory is touched."""
    path = tmp_path / "sparse"
    with open(path, "wb") as f:
        f.truncate(2**32)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        view = memoryview(mapped)
        try:
            for codec in codec_pair:
                with pytest.raises(struct.error, match="format requires"):
                    codec.encode_frame(7, 0, 1, view)
                with pytest.raises(struct.error, match="format requires"):
                    codec.encode_frame(7, 0, 1, view.cast("c"))
        finally:
            view.release()


def test_compiled_codec_imports_on_its_own(codec_pair):
    """``import tunnel._frames`` first (as the codec tests do) works and does not load the
    twin (it used to import the twin, which imported it back half-initialised)."""
    code = "import sys, tunnel._frames as f; print(f.IMPLEMENTATION, 'tunnel.codec.pure' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["cython", "False"]
