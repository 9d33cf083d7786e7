"""Wire constants of the tunnel protocol (docs/PROTOCOL.md)."""

from enum import IntEnum, IntFlag

PROTOCOL_VERSION = 1
MIN_PROTOCOL_VERSION = 1
HEADER_SIZE = 12
MAX_FRAME_SIZE_CAP = 16 * 1024 * 1024
MIN_FRAME_SIZE = 16 * 1024
MAX_WINDOW = 2**31 - 1
MAX_STREAM_ID = 2**32 - 1
MAX_GOAWAY_REASON = 1024
WS_SUBPROTOCOL = "tunnel.v1"
WS_PATH = "/v1/link"
#: The QUIC mapping (docs/PROTOCOL.md, "QUIC mapping"); ``tunnel/1`` was 0.1.0's.
QUIC_ALPN = "tunnel/2"


class FrameType(IntEnum):
    DATA = 0x0
    OPEN = 0x1
    RESET = 0x2
    WINDOW_UPDATE = 0x3
    PING = 0x4
    GOAWAY = 0x5
    HELLO = 0x6
    CONTROL = 0x7


class Flags(IntFlag):
    NONE = 0
    FIN = 0x01
    ACK = 0x02


#: Not a wire flag: the decoder sets it on a DATA piece when more of the same frame follows.
PARTIAL = 0x100

#: Which wire flags each frame type may carry.
ALLOWED_FLAGS = {
    FrameType.DATA: Flags.FIN,
    FrameType.OPEN: Flags.FIN,
    FrameType.RESET: 0,
    FrameType.WINDOW_UPDATE: 0,
    FrameType.PING: Flags.ACK,
    FrameType.GOAWAY: 0,
    FrameType.HELLO: 0,
    FrameType.CONTROL: 0,
}


class ErrorCode(IntEnum):
    NO_ERROR = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2
    FLOW_CONTROL_ERROR = 3
    STREAM_CLOSED = 4
    FRAME_SIZE_ERROR = 5
    REFUSED = 6
    CONNECT_FAILED = 7
    CONNECTION_RESET = 8
    TIMEOUT = 9
    STREAM_LIMIT = 10
    ENHANCE_YOUR_CALM = 11
    VERSION_MISMATCH = 12
    UNAUTHORIZED = 13

    @classmethod
    def known(cls, code: int) -> bool:
        """True if ``code`` is one of ours (a peer may send any number)."""
        return code in cls._value2member_map_


def describe_code(code: int, reason: str = "") -> str:
    """How logs and errors name why a link or stream ended: the reason when there is one,
    else the code's name (``TIMEOUT``), else the number."""
    if reason:
        return reason
    return ErrorCode(code).name if ErrorCode.known(code) else str(code)
