"""Type stub of the frame codec ``tunnel._frames`` (Cython, built from ``_frames.pyx``).

The pure-Python twin ``tunnel.codec.pure`` has the same API and behaviour; import
``tunnel.codec`` to get whichever is in use. Wire format: docs/PROTOCOL.md.

Buffers ("bytes-like") are read as their bytes: ``bytes``, ``bytearray`` and 1-D contiguous
``'B'`` memoryviews are the fast paths; any other C-contiguous buffer is taken through
``memoryview(obj).cast("B")``, and anything else is a TypeError. Every error the peer can cause
is a :class:`tunnel.wire.errors.ProtocolError` (``FrameTooLarge`` for an oversized frame).
Integers go through ``struct``'s formats, as in the twin: out of range is ``struct.error``.
"""

import sys
from collections.abc import Iterable
from typing import Final, TypeAlias

if sys.version_info >= (3, 12):
    from collections.abc import Buffer
else:  # a stub is never imported at run time: typeshed ships typing_extensions to type checkers
    from typing_extensions import Buffer

#: ``"cython"`` here, ``"python"`` in the twin.
IMPLEMENTATION: Final[str]
#: Size of a HELLO payload (20 bytes).
HELLO_SIZE: Final[int]

#: ``(frame_type, flags, stream_id, payload)``. ``payload`` is a memoryview of the fed chunk
#: when the payload lay wholly inside it, else a piece of it (DATA, ``PARTIAL`` set on all but
#: the last piece) or ``bytes`` (other types, assembled once).
Frame: TypeAlias = tuple[int, int, int, memoryview | bytes]

def encode_header(frame_type: int, flags: int, stream_id: int, length: int) -> bytes:
    """The 12-byte frame header; send it followed by ``length`` payload bytes."""

def encode_frame(frame_type: int, flags: int, stream_id: int, payload: Buffer = b"") -> bytes:
    """Header and payload as one bytes object (control frames; DATA uses encode_header)."""

class FrameDecoder:
    """Incremental frame decoder.

    ``feed`` returns the frames the bytes complete. Header checks (unknown type, reserved bits,
    flags the type may not carry, ``length > max_frame_size``) happen before anything is
    allocated for the payload and raise ``ProtocolError`` / ``FrameTooLarge``; afterwards
    every ``feed`` raises ``ProtocolError``.
    """

    #: Largest payload accepted; may be changed between calls to ``feed``.
    max_frame_size: int

    def __init__(self, max_frame_size: int) -> None: ...
    @property
    def buffered(self) -> int:
        """Bytes held inside the decoder (partial header and partial non-DATA payload)."""
    def feed(self, data: Buffer) -> list[Frame]:
        """Decode what ``data`` completes. Returned memoryviews point into ``data``: keep it
        unchanged while they are in use."""

def parse_u32(payload: Buffer) -> int:
    """The u32 of a RESET or WINDOW_UPDATE payload; ProtocolError unless 4 bytes long."""

def encode_u32(value: int) -> bytes: ...

def encode_hello(min_version: int, max_version: int, stream_window: int, session_window: int,
                 max_frame_size: int, max_streams: int) -> bytes:
    """A HELLO payload (``HELLO_SIZE`` bytes)."""

def parse_hello(payload: Buffer) -> tuple[int, int, int, int, int, int]:
    """``(min_version, max_version, stream_window, session_window, max_frame_size,
    max_streams)``; ProtocolError if shorter than ``HELLO_SIZE``, trailing bytes ignored."""

def encode_goaway(last_stream_id: int, code: int, reason: str = "") -> bytes:
    """A GOAWAY payload; the UTF-8 reason is cut to 1024 bytes."""

def parse_goaway(payload: Buffer) -> tuple[int, int, str]:
    """``(last_stream_id, code, reason)``; ProtocolError unless 8 to 8 + 1024 bytes long.
    Invalid UTF-8 in the reason is replaced, not an error."""

def ws_mask(data: Buffer, key: Buffer, offset: int = 0) -> bytes:
    """``data`` XOR the 4-byte ``key`` starting at key position ``offset % 4`` (masking and
    unmasking are the same operation). ValueError if ``key`` is not 4 bytes long."""

def ws_mask_join(buffers: Iterable[Buffer], key: Buffer) -> bytes:
    """``ws_mask(b"".join(buffers), key)`` in one pass, into one new bytes object."""

def ws_mask_join_into(buffers: Iterable[Buffer], key: Buffer, out: Buffer) -> int:
    """``ws_mask_join(buffers, key)`` written into ``out`` (a ``bytearray``, or any writable
    buffer) from its start, no allocation; returns the byte count. ValueError if ``out`` is too
    small, TypeError if it is read-only."""

def encode_ws_header(opcode: int, fin: bool, length: int, mask_key: Buffer | None = None) -> bytes:
    """An RFC 6455 frame header (7-, 16- or 64-bit length form), ``mask_key`` appended
    (ValueError unless it is 4 bytes long)."""

def parse_ws_header(buf: Buffer, offset: int = 0) -> tuple[bool, int, int, bytes | None, int] | None:
    """``(fin, opcode, length, mask_key, header_size)`` of the header at ``buf[offset:]``, or
    None while incomplete (also for an ``offset`` at or past the end). ProtocolError for RSV
    bits, a fragmented or > 125-byte control frame, or a 64-bit length with its top bit set;
    ValueError for a negative ``offset``."""
