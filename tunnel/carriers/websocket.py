"""Sans-IO RFC 6455 WebSocket, as much of it as the tunnel's link needs (docs/PROTOCOL.md,
"WebSocket mapping").

No sockets, no clocks, no logging here; the asyncio adapter is :mod:`tunnel.carriers.wss`.

- :class:`ClientHandshake`: the agent's upgrade request (path ``/v1/link``, subprotocol
  ``tunnel.v1``) and the validation of the relay's ``101`` answer.
- :class:`ServerHandshake`: the relay's parser of the upgrade request head (bounded by
  ``limits.max_http_header_size``) that answers ``101`` or an HTTP error (400, 404, 426, 431).
- :class:`WebSocketConnection`: the frame layer once upgraded. ``receive_data(chunk)`` returns
  the binary payload as a list of pieces (message and frame boundaries carry no meaning for
  the tunnel; a piece is handed out as soon as it arrives, without waiting for the rest of its
  frame); control frames queue their answers (pong, close) for ``data_to_send()``.
  ``encode_message(buffers)`` frames one outgoing binary message (a client masks it with a
  fresh key: one copy; a server sends the buffers unchanged behind a header: no copy).

Protocol violations never raise: the connection queues a close frame with the RFC's status
code (1002 protocol error, 1003 text data, 1007 bad UTF-8 in a close reason, 1009 frame too
big), records ``failure`` and stops parsing.
"""

from __future__ import annotations

import base64
import binascii
import enum
import os
import struct
from collections.abc import Sequence

from tunnel import codec as frames
from tunnel.wire.constants import WS_PATH, WS_SUBPROTOCOL
from tunnel.wire.errors import HandshakeError, ProtocolError

__all__ = [
    "ClientHandshake",
    "ServerHandshake",
    "WebSocketConnection",
    "HandshakeError",
    "CloseCode",
    "State",
    "accept_key",
    "make_key",
]

try:  # CPython's own SHA-1: hashlib would load OpenSSL's digest tables, 0.6 MB of agent RSS
    from _sha1 import sha1 as _sha1
except ImportError:  # pragma: no cover - other interpreters
    from hashlib import sha1 as _sha1

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_CRLF2 = b"\r\n\r\n"


class Opcode(enum.IntEnum):
    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


class CloseCode(enum.IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS = 1005  # never on the wire: the close frame had no payload
    ABNORMAL = 1006  # never on the wire: the TCP connection ended without a close frame
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    MANDATORY_EXTENSION = 1010
    INTERNAL_ERROR = 1011


#: Codes a peer may put in a close frame (RFC 6455 7.4.1 plus the IANA registry's 1012-1014).
_VALID_CLOSE = frozenset([1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014])


def _close_code_valid(code: int) -> bool:
    return code in _VALID_CLOSE or 3000 <= code <= 4999


# --- handshake ---------------------------------------------------------------------------

def make_key() -> str:
    """A fresh Sec-WebSocket-Key: 16 random bytes, base64."""
    return base64.b64encode(os.urandom(16)).decode("ascii")


def accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for ``key`` (RFC 6455 section 4.2.2)."""
    return base64.b64encode(_sha1(key.encode("ascii") + _GUID).digest()).decode("ascii")


def _tokens(value: str) -> list[str]:
    """Lower-cased tokens of a comma-separated header value."""
    return [t.strip().lower() for t in value.split(",") if t.strip()]


def _parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    """Split an HTTP head (without the final CRLFCRLF) into its first line and headers.

    Repeated headers are joined with ", " (RFC 9110 5.3). Raises ValueError when malformed.
    """
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        raise ValueError("undecodable head") from None
    lines = text.split("\r\n")
    first = lines[0]
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            raise ValueError("empty header line")
        if line[0] in " \t":
            raise ValueError("obsolete header folding")
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or any(c in name for c in " \t\"(),/;<=>?@[\\]{}"):
            raise ValueError("malformed header line")
        name = name.lower()
        value = value.strip(" \t")
        if name in headers:
            headers[name] = headers[name] + ", " + value
        else:
            headers[name] = value
    return first, headers


def _format_host(host: str, port: int, default_port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return host if port == default_port else f"{host}:{port}"


class ClientHandshake:
    """The agent's side of the upgrade.

    ``request()`` gives the bytes to send; feed the answer to ``receive_data`` until it
    returns the bytes that followed the answer's head (WebSocket frames already sent by the
    server, usually empty). Raises :class:`HandshakeError` when the answer is not a valid 101.
    """

    def __init__(self, host: str, port: int, *, secure: bool = True, path: str = WS_PATH,
                 subprotocol: str = WS_SUBPROTOCOL, key: str | None = None,
                 max_header_size: int = 16 * 1024) -> None:
        self.host = host
        self.port = port
        self.path = path or "/"
        self.subprotocol = subprotocol
        self.key = key if key is not None else make_key()
        self.max_header_size = max_header_size
        self.host_header = _format_host(host, port, 443 if secure else 80)
        self._buffer = bytearray()
        self.status = 0
        self.headers: dict[str, str] = {}
        self.done = False

    def request(self) -> bytes:
        return (
            f"GET {self.path} HTTP/1.1\r\n"
            f"Host: {self.host_header}\r\n"
            "Upgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {self.key}\r\n"
            "Sec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Protocol: {self.subprotocol}\r\n"
            "User-Agent: tunnel-agent\r\n"
            "\r\n"
        ).encode("ascii")

    def receive_data(self, data) -> bytes | None:
        """None while the answer's head is incomplete; then the bytes after it."""
        if self.done:
            raise HandshakeError("handshake already complete")
        self._buffer += data
        end = self._buffer.find(_CRLF2)
        if end < 0:
            if len(self._buffer) > self.max_header_size:
                raise HandshakeError("upgrade response head too large")
            return None
        if end > self.max_header_size:
            raise HandshakeError("upgrade response head too large")
        head = bytes(self._buffer[:end])
        rest = bytes(self._buffer[end + 4:])
        self._buffer = bytearray()
        self._validate(head)
        self.done = True
        return rest

    def _validate(self, head: bytes) -> None:
        try:
            first, headers = _parse_head(head)
        except ValueError as exc:
            raise HandshakeError(f"malformed upgrade response: {exc}") from None
        parts = first.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise HandshakeError(f"malformed status line {first[:80]!r}")
        self.status = int(parts[1])
        self.headers = headers
        if self.status != 101:
            reason = parts[2] if len(parts) > 2 else ""
            raise HandshakeError(f"upgrade refused: HTTP {self.status} {reason}"[:200].rstrip(), self.status)
        if "websocket" not in _tokens(headers.get("upgrade", "")):
            raise HandshakeError("101 response without Upgrade: websocket", 101)
        if "upgrade" not in _tokens(headers.get("connection", "")):
            raise HandshakeError("101 response without Connection: upgrade", 101)
        if headers.get("sec-websocket-accept", "") != accept_key(self.key):
            raise HandshakeError("wrong Sec-WebSocket-Accept", 101)
        if headers.get("sec-websocket-protocol", "") != self.subprotocol:
            raise HandshakeError(f"server did not select subprotocol {self.subprotocol}", 101)
        if headers.get("sec-websocket-extensions"):
            raise HandshakeError("server selected an extension we did not offer", 101)


class ServerHandshake:
    """The relay's side of the upgrade.

    Feed bytes to ``receive_data`` until it returns True (the head is complete). Then
    ``accepted`` tells whether the upgrade succeeded, ``response`` holds the bytes to send
    (a 101, or an HTTP error to send before closing) and ``leftover`` the bytes that followed
    the request head (the client's first frames).
    """

    def __init__(self, max_header_size: int, *, path: str = WS_PATH,
                 subprotocol: str = WS_SUBPROTOCOL) -> None:
        self.max_header_size = max_header_size
        self.path = path
        self.subprotocol = subprotocol
        self._buffer = bytearray()
        self.done = False
        self.accepted = False
        self.status = 0
        self.reason = ""
        self.response = b""
        self.leftover = b""
        self.headers: dict[str, str] = {}
        self.request_path = ""
        #: The X-Forwarded-For value a reverse proxy added (logging only; never trusted).
        self.forwarded_for: str | None = None

    def receive_data(self, data) -> bool:
        if self.done:
            raise ProtocolError("handshake already complete")
        # Only look for the terminator in the new bytes (plus 3 bytes of overlap).
        start = max(0, len(self._buffer) - 3)
        self._buffer += data
        end = self._buffer.find(_CRLF2, start)
        if end < 0:
            if len(self._buffer) > self.max_header_size:
                self._reject(431, "Request Header Fields Too Large", "request head too large")
                return True
            return False
        if end + 4 > self.max_header_size:
            self._reject(431, "Request Header Fields Too Large", "request head too large")
            return True
        head = bytes(self._buffer[:end])
        self.leftover = bytes(self._buffer[end + 4:])
        self._buffer = bytearray()
        self._process(head)
        return True

    def _reject(self, status: int, phrase: str, reason: str, extra: str = "") -> None:
        self.done = True
        self.accepted = False
        self.status = status
        self.reason = reason
        self.leftover = b""
        self._buffer = bytearray()
        body = (reason + "\n").encode("ascii", "replace")
        self.response = (
            f"HTTP/1.1 {status} {phrase}\r\n"
            "Content-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"{extra}"
            "Connection: close\r\n"
            "\r\n"
        ).encode("ascii") + body

    def _process(self, head: bytes) -> None:
        try:
            first, headers = _parse_head(head)
        except ValueError as exc:
            return self._reject(400, "Bad Request", f"malformed request head: {exc}")
        parts = first.split(" ")
        if len(parts) != 3:
            return self._reject(400, "Bad Request", "malformed request line")
        method, target, version = parts
        self.headers = headers
        if version != "HTTP/1.1":
            return self._reject(400, "Bad Request", "HTTP/1.1 required")
        if method != "GET":
            return self._reject(400, "Bad Request", "method must be GET")
        path = target.split("?", 1)[0]
        self.request_path = path
        if "host" not in headers:
            return self._reject(400, "Bad Request", "Host header missing")
        self.forwarded_for = headers.get("x-forwarded-for")
        if path != self.path:
            return self._reject(404, "Not Found", "not found")
        if "websocket" not in _tokens(headers.get("upgrade", "")):
            return self._reject(426, "Upgrade Required", "WebSocket upgrade required",
                                "Upgrade: websocket\r\n")
        if "upgrade" not in _tokens(headers.get("connection", "")):
            return self._reject(426, "Upgrade Required", "Connection: upgrade required",
                                "Upgrade: websocket\r\n")
        if headers.get("sec-websocket-version", "").strip() != "13":
            return self._reject(426, "Upgrade Required", "WebSocket version 13 required",
                                "Sec-WebSocket-Version: 13\r\n")
        key = headers.get("sec-websocket-key", "")
        try:
            raw = base64.b64decode(key.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError, ValueError):
            raw = b""
        if len(raw) != 16:
            return self._reject(400, "Bad Request", "invalid Sec-WebSocket-Key")
        if self.subprotocol not in [t.strip() for t in headers.get("sec-websocket-protocol", "").split(",")]:
            return self._reject(400, "Bad Request", f"subprotocol {self.subprotocol} required")
        self.done = True
        self.accepted = True
        self.status = 101
        self.response = (
            "HTTP/1.1 101 Switching Protocols\r\n"
            "Upgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept_key(key)}\r\n"
            f"Sec-WebSocket-Protocol: {self.subprotocol}\r\n"
            "\r\n"
        ).encode("ascii")


# --- frames ------------------------------------------------------------------------------

class State(enum.IntEnum):
    OPEN = 0
    #: We sent a close frame and wait for the peer's.
    CLOSING = 1
    #: Both close frames were exchanged, or the connection failed: close the transport.
    CLOSED = 2


_CLOSE_OP = int(Opcode.CLOSE)
_PING_OP = int(Opcode.PING)
_PONG_OP = int(Opcode.PONG)
_BINARY_OP = int(Opcode.BINARY)
_CONT_OP = int(Opcode.CONTINUATION)
_TEXT_OP = int(Opcode.TEXT)
_U16 = struct.Struct("!H")
#: Largest single WebSocket frame we send; bigger batches are split (peers often cap at 1 MiB).
DEFAULT_MAX_SEND = 1024 * 1024
#: Masking keys are drawn from the OS CSPRNG this many bytes at a time (one getrandom
#: syscall per 1,024 messages instead of one per message).
_KEY_POOL_SIZE = 4096
#: A client's message above this size is masked into a reused buffer of the connection
#: (fresh buffers of that size cost the agent page faults); smaller ones into new bytes.
_MASK_INTO_ABOVE = 16 * 1024
#: Masking buffers a client connection keeps (each ``max_send`` bytes).
_MASK_POOL = 2
_key_pool = b""
_key_pos = 0


def buffer_in_use(buf: bytearray) -> bool:
    """True while a view of ``buf`` is alive, so it must not be written. A bytearray with
    an exported view refuses to resize: append and delete one byte at the end (in place
    once it is over-allocated)."""
    try:
        buf.append(0)
    except BufferError:
        return True
    del buf[-1]
    return False


def _mask_key() -> bytes:
    """A fresh, unpredictable 4-byte masking key (RFC 6455 5.3), from ``os.urandom``."""
    global _key_pool, _key_pos
    pos = _key_pos
    if pos + 4 > len(_key_pool):
        _key_pool = os.urandom(_KEY_POOL_SIZE)
        pos = 0
    _key_pos = pos + 4
    return _key_pool[pos:pos + 4]


class WebSocketConnection:
    """The frame layer of one upgraded WebSocket connection (client or server side)."""

    __slots__ = (
        "client", "max_frame_size", "max_send", "state", "close_code", "close_reason",
        "failure", "_out", "_head", "_remaining", "_key", "_offset", "_opcode", "_ctrl",
        "_in_message", "_data_op", "close_sent", "close_received", "_mask_pool",
    )

    def __init__(self, client: bool, max_frame_size: int, max_send: int = DEFAULT_MAX_SEND) -> None:
        self.client = client
        self.max_frame_size = max_frame_size
        self.max_send = max(1, min(max_send, max_frame_size))
        self.state = State.OPEN
        #: The code and reason of the peer's close frame (1006 until one arrives).
        self.close_code = int(CloseCode.ABNORMAL)
        self.close_reason = ""
        #: Why we failed the connection (a protocol violation by the peer), else None.
        self.failure: str | None = None
        self.close_sent = False
        self.close_received = False
        self._out: list[bytes] = []
        self._head = bytearray()  # a partial frame header
        self._remaining = 0  # payload bytes of the current frame still to come
        self._key: bytes | None = None  # mask key of the current frame
        self._offset = 0  # payload bytes of the current frame already seen (mask position)
        self._opcode = -1  # opcode of the frame whose payload is pending; -1 between frames
        self._ctrl: bytearray | None = None  # control frame payload being assembled
        self._in_message = False  # a binary message began and its final frame is pending
        self._data_op = False
        self._mask_pool: list[bytearray] = []  # client: reused masking buffers

    # -- receiving --

    def data_to_send(self) -> list[bytes]:
        """Frames queued by the receiver (pongs, close frames); empties the queue."""
        out, self._out = self._out, []
        return out

    def receive_data(self, data) -> list:
        """Feed transport bytes; return the binary payload pieces they completed, in order.

        Pieces are memoryviews of ``data`` (unmasked frames) or fresh bytes (masked ones);
        a view is valid only while ``data`` is. After a close or a failure, later bytes are
        ignored.
        """
        if self.close_received or self.failure is not None:
            return []
        view = data if isinstance(data, memoryview) else memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        pieces: list = []
        pos = 0
        end = len(view)
        try:
            while pos < end:
                if self._opcode < 0:
                    pos = self._read_header(view, pos, end)
                    if self._opcode < 0:
                        break  # header incomplete
                    if self._remaining == 0:
                        self._frame_done(pieces)
                        if self.close_received:
                            break
                    continue
                take = self._remaining if self._remaining <= end - pos else end - pos
                chunk = view[pos:pos + take]
                pos += take
                self._remaining -= take
                if self._key is not None:
                    chunk = frames.ws_mask(chunk, self._key, self._offset)
                    self._offset += take
                if self._data_op:
                    pieces.append(chunk)
                else:
                    self._ctrl += chunk
                if self._remaining == 0:
                    self._frame_done(pieces)
                    if self.close_received:
                        break
        except ProtocolError as exc:
            self._fail(getattr(exc, "ws_code", CloseCode.PROTOCOL_ERROR), str(exc))
        return pieces

    def _read_header(self, view, pos: int, end: int) -> int:
        if self._head:
            old = len(self._head)
            self._head += view[pos:pos + 14 - old]
            parsed = frames.parse_ws_header(self._head, 0)
            if parsed is None:
                if end - pos + old >= 14:  # pragma: no cover - 14 bytes always hold a header
                    raise ProtocolError("unparsable WebSocket header")
                return end
            fin, opcode, length, key, size = parsed
            pos += size - old
            self._head.clear()
        else:
            parsed = frames.parse_ws_header(view, pos)
            if parsed is None:
                self._head += view[pos:end]
                return end
            fin, opcode, length, key, size = parsed
            pos += size
        self._start_frame(fin, opcode, length, key)
        return pos

    def _start_frame(self, fin: bool, opcode: int, length: int, key: bytes | None) -> None:
        if self.client:
            if key is not None:
                raise ProtocolError("masked frame from the server")
        elif key is None:
            raise ProtocolError("unmasked frame from the client")
        if opcode == _BINARY_OP:
            if self._in_message:
                raise ProtocolError("new message before the previous one ended")
            self._data_op = True
            self._in_message = not fin
        elif opcode == _CONT_OP:
            if not self._in_message:
                raise ProtocolError("continuation frame outside a message")
            self._data_op = True
            self._in_message = not fin
        elif opcode == _TEXT_OP:
            raise _Fail(CloseCode.UNSUPPORTED_DATA, "text messages are not supported")
        elif opcode in (_CLOSE_OP, _PING_OP, _PONG_OP):
            self._data_op = False
            self._ctrl = bytearray()
        else:
            raise ProtocolError(f"unknown WebSocket opcode 0x{opcode:x}")
        if length > self.max_frame_size:
            raise _Fail(CloseCode.MESSAGE_TOO_BIG,
                        f"WebSocket frame of {length} bytes exceeds {self.max_frame_size}")
        self._opcode = opcode
        self._remaining = length
        self._key = key
        self._offset = 0

    def _frame_done(self, pieces: list) -> None:
        opcode = self._opcode
        self._opcode = -1
        if self._data_op:
            return
        payload = bytes(self._ctrl)
        self._ctrl = None
        if opcode == _PING_OP:
            if self.state == State.OPEN:
                self._out.append(self._encode(_PONG_OP, payload))
        elif opcode == _CLOSE_OP:
            self._close_frame_received(payload)
        # A pong needs nothing: the session does its own keepalive.

    def _close_frame_received(self, payload: bytes) -> None:
        if len(payload) == 0:
            code, reason = int(CloseCode.NO_STATUS), ""
        elif len(payload) == 1:
            raise ProtocolError("close frame with a 1-byte payload")
        else:
            code = _U16.unpack_from(payload)[0]
            if not _close_code_valid(code):
                raise ProtocolError(f"invalid close code {code}")
            try:
                reason = payload[2:].decode("utf-8")
            except UnicodeDecodeError:
                raise _Fail(CloseCode.INVALID_DATA, "close reason is not UTF-8") from None
        self.close_code = code
        self.close_reason = reason
        self.close_received = True
        if not self.close_sent:
            echo = code if code != CloseCode.NO_STATUS else None
            self._out.append(self._encode_close(echo, ""))
            self.close_sent = True
        self.state = State.CLOSED

    def _fail(self, code: int, message: str) -> None:
        self.failure = message
        if not self.close_sent:
            self._out.append(self._encode_close(int(code), message[:120]))
            self.close_sent = True
        self.state = State.CLOSED
        self._ctrl = None
        self._head.clear()

    # -- sending --

    def _encode(self, opcode: int, payload: bytes) -> bytes:
        if self.client:
            key = _mask_key()
            return frames.encode_ws_header(opcode, True, len(payload), key) + frames.ws_mask(payload, key)
        return frames.encode_ws_header(opcode, True, len(payload)) + payload

    def _encode_close(self, code: int | None, reason: str) -> bytes:
        if code is None:
            return self._encode(_CLOSE_OP, b"")
        raw = reason.encode("utf-8")[:123]
        while True:  # never cut a UTF-8 sequence in half
            try:
                raw.decode("utf-8")
                break
            except UnicodeDecodeError:
                raw = raw[:-1]
        return self._encode(_CLOSE_OP, _U16.pack(code) + raw)

    def encode_message(self, buffers: Sequence) -> list:
        """Buffers to write for one binary message holding ``buffers`` (split into several
        messages above ``max_send`` bytes). Empty input gives an empty list."""
        messages = self.encode_messages(buffers)
        if len(messages) == 1:
            return messages[0]
        out: list = []
        for message in messages:
            out += message
        return out

    def encode_messages(self, buffers: Sequence) -> list[list]:
        """:meth:`encode_message`, one list of buffers per WebSocket message."""
        total = 0
        for b in buffers:
            total += len(b)
        if total == 0:
            return []
        if total <= self.max_send:
            return [self._encode_one(buffers, total)]
        out: list = []
        group: list = []
        size = 0
        limit = self.max_send
        for b in buffers:
            view = memoryview(b).cast("B") if not isinstance(b, bytes) else b
            start = 0
            n = len(view)
            while start < n:
                take = min(n - start, limit - size)
                group.append(view[start:start + take] if (start or take != n) else view)
                size += take
                start += take
                if size == limit:
                    out.append(self._encode_one(group, size))
                    group = []
                    size = 0
        if size:
            out.append(self._encode_one(group, size))
        return out

    def _encode_one(self, buffers: Sequence, total: int) -> list:
        if self.client:
            key = _mask_key()
            header = frames.encode_ws_header(_BINARY_OP, True, total, key)
            if total > _MASK_INTO_ABOVE:
                buf = self._mask_buffer()
                if buf is not None:
                    frames.ws_mask_join_into(buffers, key, buf)
                    # A view: the buffer stays untouched while anyone still holds it.
                    return [header, memoryview(buf)[:total]]
            return [header, frames.ws_mask_join(buffers, key)]
        out = [frames.encode_ws_header(_BINARY_OP, True, total)]
        out += buffers
        return out

    def _mask_buffer(self) -> bytearray | None:
        """A masking buffer of ``max_send`` bytes no view refers to, or None (all in use)."""
        pool = self._mask_pool
        for buf in pool:
            if not buffer_in_use(buf):
                return buf
        if len(pool) < _MASK_POOL:
            buf = bytearray(self.max_send)
            pool.append(buf)
            return buf
        return None

    def encode_ping(self, payload: bytes = b"") -> bytes:
        if len(payload) > 125:
            raise ValueError("ping payload above 125 bytes")
        return self._encode(_PING_OP, payload)

    def encode_close(self, code: int = CloseCode.NORMAL, reason: str = "") -> bytes:
        """Start the closing handshake: the close frame to send (b"" if one was sent already).
        The connection is CLOSED once the peer's close frame arrives (CLOSING until then)."""
        if self.close_sent:
            return b""
        self.close_sent = True
        if self.state == State.OPEN:
            self.state = State.CLOSING
        return self._encode_close(int(code), reason)


class _Fail(ProtocolError):
    """A violation closed with a specific WebSocket code (not 1002)."""

    def __init__(self, ws_code: int, message: str) -> None:
        super().__init__(message)
        self.ws_code = int(ws_code)

