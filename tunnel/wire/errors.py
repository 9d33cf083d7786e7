"""The tunnel's exceptions, one tree::

    TunnelError
    ├── ProtocolError            the peer broke the protocol; carries the wire error code
    │   ├── FrameTooLarge        FRAME_SIZE_ERROR
    │   ├── FlowControlError     FLOW_CONTROL_ERROR
    │   ├── StreamStateError     PROTOCOL_ERROR or STREAM_CLOSED (frame in the wrong state)
    │   ├── FloodError           ENHANCE_YOUR_CALM
    │   └── VersionMismatch      VERSION_MISMATCH
    ├── UsageError               this side misused the API (a bug here, not the peer's fault)
    │   ├── StreamClosedError    sending on a stream this side already ended
    │   └── SessionClosed        using a session that has closed
    ├── LinkError                a carrier failed (TLS, WebSocket upgrade, QUIC handshake)
    │   └── HandshakeError       the WebSocket upgrade was refused or malformed
    └── AuthError                the relay refused the agent's credentials or registration
"""

from tunnel.wire.constants import ErrorCode


class TunnelError(Exception):
    """Base of every exception the tunnel raises on purpose."""


class ProtocolError(TunnelError):
    """The peer sent something the protocol forbids; the link must close with ``code``."""

    code = ErrorCode.PROTOCOL_ERROR

    def __init__(self, message: str, code: "ErrorCode | None" = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = ErrorCode(code)


class FrameTooLarge(ProtocolError):
    code = ErrorCode.FRAME_SIZE_ERROR


class FlowControlError(ProtocolError):
    code = ErrorCode.FLOW_CONTROL_ERROR


class StreamStateError(ProtocolError):
    code = ErrorCode.PROTOCOL_ERROR


class FloodError(ProtocolError):
    code = ErrorCode.ENHANCE_YOUR_CALM


class VersionMismatch(ProtocolError):
    code = ErrorCode.VERSION_MISMATCH


class UsageError(TunnelError):
    """This side called the API wrongly (a local bug, never the peer's doing)."""


class StreamClosedError(UsageError):
    """Writing to a stream after ending it (``write_eof``) or through a closed session. (A
    write racing the peer's reset is not an error: the bytes are dropped.)"""


class SessionClosed(UsageError):
    pass


class LinkError(TunnelError):
    """A carrier could not be set up or broke (TLS, WebSocket, QUIC)."""


class HandshakeError(LinkError):
    """The WebSocket upgrade failed; ``status`` is the HTTP status involved (0 if none)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class AuthError(TunnelError):
    """The relay refused this agent; ``fatal`` means retrying the same credentials is futile."""

    def __init__(self, message: str, code: str = "unauthorized", fatal: bool = True) -> None:
        super().__init__(message)
        self.code = code
        self.fatal = fatal
