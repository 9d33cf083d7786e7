"""The frame codec in use: the compiled ``tunnel._frames`` when it is built, else the
pure-Python twin ``tunnel.codec.pure`` (same API, same behaviour). ``TUNNEL_PURE_PYTHON=1``
forces the twin (debugging, tests; read once, as ``tunnel.PURE_PYTHON``).

``IMPLEMENTATION`` says which one was loaded (``"cython"`` or ``"python"``). The API is
documented in ``tunnel/_frames.pyi``.
"""

from tunnel import PURE_PYTHON
from tunnel.wire.constants import ALLOWED_FLAGS, HEADER_SIZE, MAX_GOAWAY_REASON, PARTIAL, Flags, FrameType  # noqa: F401
from tunnel.wire.errors import FrameTooLarge, ProtocolError  # noqa: F401

if PURE_PYTHON:
    from tunnel.codec import pure as _impl
else:
    try:
        from tunnel import _frames as _impl
    except ImportError:  # not built: fall back to the twin
        from tunnel.codec import pure as _impl

HELLO_SIZE = _impl.HELLO_SIZE
IMPLEMENTATION = _impl.IMPLEMENTATION
FrameDecoder = _impl.FrameDecoder
encode_header = _impl.encode_header
encode_frame = _impl.encode_frame
parse_u32 = _impl.parse_u32
encode_u32 = _impl.encode_u32
encode_hello = _impl.encode_hello
parse_hello = _impl.parse_hello
encode_goaway = _impl.encode_goaway
parse_goaway = _impl.parse_goaway
ws_mask = _impl.ws_mask
ws_mask_join = _impl.ws_mask_join
ws_mask_join_into = _impl.ws_mask_join_into
encode_ws_header = _impl.encode_ws_header
parse_ws_header = _impl.parse_ws_header

__all__ = list(_impl.__all__) + [
    "ALLOWED_FLAGS", "HEADER_SIZE", "MAX_GOAWAY_REASON", "PARTIAL", "Flags", "FrameType",
    "FrameTooLarge", "ProtocolError",
]
