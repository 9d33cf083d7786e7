"""Pure-Python twin of the Cython codec ``tunnel._frames``: same API, same behaviour.

Frames (docs/PROTOCOL.md) and the WebSocket primitives the carrier needs. Decoding is
incremental and zero-copy where it can be: payloads that lie wholly inside one fed chunk are
returned as memoryviews of that chunk; DATA payloads that span chunks are returned piece by
piece (flag ``PARTIAL`` on every piece but the last), so stream bytes are never reassembled;
other payloads that span chunks are assembled once into a buffer of their declared size.

Buffer arguments are read as their bytes: ``bytes`` and ``bytearray`` as they are, any other
C-contiguous buffer (a memoryview of any format, an ``array.array``...) through
``memoryview(obj).cast("B")``, which raises TypeError for anything else.
"""

from __future__ import annotations

import operator
import struct

from tunnel.wire.constants import (
    ALLOWED_FLAGS,
    HEADER_SIZE,
    MAX_GOAWAY_REASON,
    PARTIAL,
    FrameType,
)
from tunnel.wire.errors import FrameTooLarge, ProtocolError

__all__ = [
    "HELLO_SIZE", "IMPLEMENTATION", "FrameDecoder", "encode_header", "encode_frame", "parse_u32",
    "encode_u32", "encode_hello", "parse_hello", "encode_goaway", "parse_goaway", "ws_mask",
    "ws_mask_join", "ws_mask_join_into", "encode_ws_header", "parse_ws_header",
]

IMPLEMENTATION = "python"

_HEADER = struct.Struct("!BBHII")
_U32 = struct.Struct("!I")
_GOAWAY = struct.Struct("!II")
_HELLO = struct.Struct("!BBHIIII")
HELLO_SIZE = _HELLO.size

_DATA = int(FrameType.DATA)
_MAX_TYPE = max(FrameType)
_ALLOWED = [int(ALLOWED_FLAGS[FrameType(t)]) for t in range(_MAX_TYPE + 1)]


def _as_bytes(obj):
    """``obj`` read as its bytes (see the module docstring); TypeError if it is no buffer."""
    if type(obj) is bytes or type(obj) is bytearray:
        return obj
    return memoryview(obj).cast("B")


def encode_header(frame_type: int, flags: int, stream_id: int, length: int) -> bytes:
    """The 12-byte header of a frame; send it followed by ``length`` payload bytes."""
    return _HEADER.pack(frame_type, flags, 0, stream_id, length)


def encode_frame(frame_type: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """A whole small frame as one bytes object (control frames; DATA uses encode_header)."""
    payload = _as_bytes(payload)
    return _HEADER.pack(frame_type, flags, 0, stream_id, len(payload)) + payload


class FrameDecoder:
    """Incremental frame decoder: ``feed`` bytes, get ``(type, flags, stream_id, payload)``.

    Any header error raises a :class:`ProtocolError` (``FrameTooLarge`` for a declared length
    above ``max_frame_size``, checked before anything is allocated); the decoder is then
    unusable and the link must close.
    """

    __slots__ = ("max_frame_size", "_head", "_type", "_flags", "_sid", "_remaining", "_body", "_body_len", "_failed")

    def __init__(self, max_frame_size: int) -> None:
        self.max_frame_size = max_frame_size
        self._head = bytearray()  # partial header bytes
        self._type = -1  # type of the frame whose payload is pending, -1 between frames
        self._flags = 0
        self._sid = 0
        self._remaining = 0  # payload bytes of the current frame not yet received
        self._body: bytearray | None = None  # assembly buffer for non-DATA payloads
        self._body_len = 0
        self._failed = False

    @property
    def buffered(self) -> int:
        """Bytes held inside the decoder (partial header and partial control payload)."""
        return len(self._head) + self._body_len

    def _check_header(self, ftype: int, flags: int, reserved: int, length: int) -> None:
        if ftype > _MAX_TYPE:
            raise ProtocolError(f"unknown frame type 0x{ftype:x}")
        if reserved:
            raise ProtocolError("reserved header bits set")
        if flags & ~_ALLOWED[ftype]:
            raise ProtocolError(f"flags 0x{flags:x} not allowed on {FrameType(ftype).name}")
        if length > self.max_frame_size:
            raise FrameTooLarge(f"frame of {length} bytes exceeds max_frame_size {self.max_frame_size}")

    def feed(self, data) -> list:
        if self._failed:
            raise ProtocolError("decoder used after a protocol error")
        try:
            return self._feed(data)
        except ProtocolError:
            self._failed = True
            raise

    def _feed(self, data) -> list:
        view = memoryview(data).cast("B") if not isinstance(data, memoryview) or data.format != "B" else data
        frames = []
        pos = 0
        end = len(view)
        while pos < end or (self._type >= 0 and self._remaining == 0):
            if self._type < 0:
                # Need a header.
                if self._head:
                    take = min(HEADER_SIZE - len(self._head), end - pos)
                    self._head += view[pos:pos + take]
                    pos += take
                    if len(self._head) < HEADER_SIZE:
                        break
                    ftype, flags, reserved, sid, length = _HEADER.unpack(self._head)
                    self._head.clear()
                elif end - pos >= HEADER_SIZE:
                    ftype, flags, reserved, sid, length = _HEADER.unpack_from(view, pos)
                    pos += HEADER_SIZE
                else:
                    self._head += view[pos:end]
                    pos = end
                    break
                self._check_header(ftype, flags, reserved, length)
                avail = end - pos
                if length <= avail:
                    # Whole payload in this chunk: zero-copy view.
                    frames.append((ftype, flags, sid, view[pos:pos + length]))
                    pos += length
                    continue
                self._type, self._flags, self._sid, self._remaining = ftype, flags, sid, length
                if ftype != _DATA:
                    self._body = bytearray(length)
                    self._body_len = 0
                continue
            # Inside a payload that spans chunks.
            take = min(self._remaining, end - pos)
            self._remaining -= take
            if self._type == _DATA:
                if take or self._remaining == 0:
                    last = self._remaining == 0
                    flags = self._flags if last else (self._flags & ~1) | PARTIAL
                    frames.append((_DATA, flags, self._sid, view[pos:pos + take]))
            else:
                self._body[self._body_len:self._body_len + take] = view[pos:pos + take]
                self._body_len += take
                if self._remaining == 0:
                    frames.append((self._type, self._flags, self._sid, bytes(self._body)))
                    self._body = None
                    self._body_len = 0
            pos += take
            if self._remaining == 0:
                self._type = -1
        return frames


def parse_u32(payload) -> int:
    """The single u32 of a RESET or WINDOW_UPDATE payload."""
    payload = _as_bytes(payload)
    if len(payload) != 4:
        raise ProtocolError(f"expected a 4-byte payload, got {len(payload)}")
    return _U32.unpack(payload)[0]


def encode_u32(value: int) -> bytes:
    return _U32.pack(value)


def encode_hello(min_version: int, max_version: int, stream_window: int, session_window: int,
                 max_frame_size: int, max_streams: int) -> bytes:
    return _HELLO.pack(min_version, max_version, 0, stream_window, session_window, max_frame_size, max_streams)


def parse_hello(payload) -> tuple:
    """``(min_version, max_version, stream_window, session_window, max_frame_size,
    max_streams)``; extra trailing bytes are ignored for forward compatibility."""
    payload = _as_bytes(payload)
    if len(payload) < HELLO_SIZE:
        raise ProtocolError(f"HELLO payload of {len(payload)} bytes, expected at least {HELLO_SIZE}")
    lo, hi, _reserved, sw, cw, mfs, ms = _HELLO.unpack_from(payload, 0)
    return lo, hi, sw, cw, mfs, ms


def encode_goaway(last_stream_id: int, code: int, reason: str = "") -> bytes:
    raw = reason.encode("utf-8")[:MAX_GOAWAY_REASON]
    return _GOAWAY.pack(last_stream_id, code) + raw


def parse_goaway(payload) -> tuple:
    """``(last_stream_id, code, reason)``."""
    payload = _as_bytes(payload)
    if not _GOAWAY.size <= len(payload) <= _GOAWAY.size + MAX_GOAWAY_REASON:
        raise ProtocolError(f"GOAWAY payload of {len(payload)} bytes")
    last, code = _GOAWAY.unpack_from(payload, 0)
    reason = bytes(payload[_GOAWAY.size:]).decode("utf-8", "replace")
    return last, code, reason


# --- WebSocket primitives (RFC 6455) ---------------------------------------------------

def ws_mask(data, key: bytes, offset: int = 0) -> bytes:
    """XOR ``data`` with the 4-byte ``key``, starting at key position ``offset % 4``.
    Masking and unmasking are the same operation. A key of another length is a ValueError."""
    key = _mask_key(key)
    data = _as_bytes(data)
    offset = operator.index(offset) % 4
    n = len(data)
    if n == 0:
        return b""
    rotated = key[offset:] + key[:offset]
    mask = int.from_bytes((rotated * ((n + 3) // 4))[:n], "big")
    return (int.from_bytes(data, "big") ^ mask).to_bytes(n, "big")


def _mask_key(key) -> bytes:
    key = bytes(_as_bytes(key))
    if len(key) != 4:
        raise ValueError(f"WebSocket mask key must be 4 bytes, got {len(key)}")
    return key


def ws_mask_join(buffers, key: bytes) -> bytes:
    """Concatenate ``buffers`` and mask the result in one pass (a client's outgoing message)."""
    return ws_mask(b"".join(buffers), key)


def ws_mask_join_into(buffers, key: bytes, out) -> int:
    """``ws_mask_join(buffers, key)`` written into the bytearray ``out`` from its start;
    returns the byte count (ValueError if ``out`` is too small)."""
    data = ws_mask_join(buffers, key)
    view = memoryview(out).cast("B")
    if len(data) > len(view):
        raise ValueError("output buffer too small")
    view[:len(data)] = data
    return len(data)


def encode_ws_header(opcode: int, fin: bool, length: int, mask_key: bytes | None = None) -> bytes:
    """A WebSocket frame header (RFC 6455 section 5.2) for a payload of ``length`` bytes;
    ``mask_key``, if given, must be 4 bytes long (ValueError)."""
    if mask_key is not None:
        mask_key = _mask_key(mask_key)
    first = (0x80 if fin else 0) | operator.index(opcode)
    length = operator.index(length)
    mask_bit = 0x80 if mask_key is not None else 0
    if length < 126:
        head = struct.pack("!BB", first, mask_bit | length)
    elif length < 65536:
        head = struct.pack("!BBH", first, mask_bit | 126, length)
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, length)
    return head + mask_key if mask_key is not None else head


def parse_ws_header(buf, offset: int = 0):
    """Parse a WebSocket frame header at ``buf[offset:]``.

    Returns None if the header is not complete yet, else ``(fin, opcode, length, mask_key,
    header_size)`` with ``mask_key`` None for an unmasked frame. Raises ProtocolError for set
    RSV bits, a fragmented or oversized (> 125 bytes) control frame, or a 64-bit length with
    its top bit set. A negative ``offset`` is a ValueError.
    """
    buf = _as_bytes(buf)
    offset = operator.index(offset)
    if offset < 0:
        raise ValueError(f"negative offset {offset}")
    avail = len(buf) - offset
    if avail < 2:
        return None
    b0 = buf[offset]
    b1 = buf[offset + 1]
    if b0 & 0x70:
        raise ProtocolError("WebSocket RSV bits set without a negotiated extension")
    fin = bool(b0 & 0x80)
    opcode = b0 & 0x0F
    masked = b1 & 0x80
    length = b1 & 0x7F
    size = 2
    if length == 126:
        if avail < 4:
            return None
        length = (buf[offset + 2] << 8) | buf[offset + 3]
        size = 4
    elif length == 127:
        if avail < 10:
            return None
        length = int.from_bytes(bytes(buf[offset + 2:offset + 10]), "big")
        if length >> 63:
            raise ProtocolError("WebSocket frame length has its top bit set")
        size = 10
    if opcode >= 8 and (length > 125 or not fin):
        raise ProtocolError("WebSocket control frame fragmented or longer than 125 bytes")
    key = None
    if masked:
        if avail < size + 4:
            return None
        key = bytes(buf[offset + size:offset + size + 4])
        size += 4
    return fin, opcode, length, key, size
