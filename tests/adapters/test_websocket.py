"""Sans-IO WebSocket (tunnel.carriers.websocket): handshake vectors both ways, every rejection with its
HTTP status, frame parsing (byte at a time, masking rules, control frames, close codes, size
limits) and the frame writer."""

from __future__ import annotations

import base64
import os
import pathlib
import struct
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tunnel import codec as frames  # noqa: E402
from tunnel.carriers.websocket import (  # noqa: E402
    ClientHandshake,
    CloseCode,
    HandshakeError,
    ServerHandshake,
    State,
    WebSocketConnection,
    accept_key,
)

RFC_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
RFC_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
MAX = 1 << 20


def test_rfc6455_sample_key():
    assert accept_key(RFC_KEY) == RFC_ACCEPT


# --- client handshake --------------------------------------------------------------------

def client_hs(**kw) -> ClientHandshake:
    kw.setdefault("key", RFC_KEY)
    return ClientHandshake("relay.example", 443, **kw)


def response(accept=RFC_ACCEPT, proto="tunnel.v1", status="101 Switching Protocols",
             upgrade="websocket", connection="Upgrade", extra="") -> bytes:
    lines = [f"HTTP/1.1 {status}"]
    if upgrade is not None:
        lines.append(f"Upgrade: {upgrade}")
    if connection is not None:
        lines.append(f"Connection: {connection}")
    if accept is not None:
        lines.append(f"Sec-WebSocket-Accept: {accept}")
    if proto is not None:
        lines.append(f"Sec-WebSocket-Protocol: {proto}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def test_client_request_bytes():
    req = client_hs().request().decode()
    lines = req.split("\r\n")
    assert lines[0] == "GET /v1/link HTTP/1.1"
    assert "Host: relay.example" in lines
    assert "Upgrade: websocket" in lines
    assert "Connection: Upgrade" in lines
    assert f"Sec-WebSocket-Key: {RFC_KEY}" in lines
    assert "Sec-WebSocket-Version: 13" in lines
    assert "Sec-WebSocket-Protocol: tunnel.v1" in lines
    assert req.endswith("\r\n\r\n")


def test_client_host_header_ports():
    assert "Host: h:8443\r\n" in ClientHandshake("h", 8443).request().decode()
    assert "Host: h\r\n" in ClientHandshake("h", 80, secure=False).request().decode()
    assert "Host: [::1]:9000\r\n" in ClientHandshake("::1", 9000).request().decode()


def test_client_fresh_keys():
    a, b = ClientHandshake("h", 1), ClientHandshake("h", 1)
    assert a.key != b.key
    assert len(base64.b64decode(a.key)) == 16


def test_client_accepts_101_byte_at_a_time_and_returns_leftover():
    hs = client_hs()
    data = response() + b"\x82\x03abc"
    rest = None
    for i in range(len(data)):
        rest = hs.receive_data(data[i:i + 1])
        if rest is not None:
            break
    assert rest == b""  # the head ended exactly here
    assert hs.done and hs.status == 101
    hs2 = client_hs()
    assert hs2.receive_data(data) == b"\x82\x03abc"


def test_client_header_tokens_case_insensitive():
    hs = client_hs()
    assert hs.receive_data(response(upgrade="WebSocket", connection="keep-alive, UPGRADE")) == b""


@pytest.mark.parametrize("resp, status", [
    (response(status="403 Forbidden"), 403),
    (response(status="200 OK"), 200),
    (response(accept="wrong="), 101),
    (response(accept=None), 101),
    (response(proto=None), 101),
    (response(proto="other"), 101),
    (response(upgrade=None), 101),
    (response(connection=None), 101),
    (response(extra="Sec-WebSocket-Extensions: permessage-deflate\r\n"), 101),
    (b"garbage\r\n\r\n", 0),
])
def test_client_rejects_bad_responses(resp, status):
    with pytest.raises(HandshakeError) as info:
        client_hs().receive_data(resp)
    assert info.value.status == status


def test_client_rejects_oversized_response():
    hs = client_hs(max_header_size=1024)
    with pytest.raises(HandshakeError):
        hs.receive_data(b"HTTP/1.1 101 OK\r\n" + b"X: " + b"a" * 2000)


# --- server handshake --------------------------------------------------------------------

def request(method="GET", path="/v1/link", version="HTTP/1.1", key=RFC_KEY, ws_version="13",
            upgrade="websocket", connection="Upgrade", proto="tunnel.v1", host="relay", extra="") -> bytes:
    lines = [f"{method} {path} {version}"]
    for name, value in (("Host", host), ("Upgrade", upgrade), ("Connection", connection),
                        ("Sec-WebSocket-Key", key), ("Sec-WebSocket-Version", ws_version),
                        ("Sec-WebSocket-Protocol", proto)):
        if value is not None:
            lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def serve(data: bytes, max_size: int = 16384) -> ServerHandshake:
    hs = ServerHandshake(max_size)
    assert hs.receive_data(data)
    return hs


def test_server_accepts_rfc_request():
    hs = serve(request() + b"\x82")
    assert hs.accepted and hs.status == 101
    assert hs.leftover == b"\x82"
    head = hs.response.decode()
    assert head.startswith("HTTP/1.1 101 ")
    assert f"Sec-WebSocket-Accept: {RFC_ACCEPT}\r\n" in head
    assert "Sec-WebSocket-Protocol: tunnel.v1\r\n" in head
    assert head.endswith("\r\n\r\n")
    # And our client takes the answer.
    assert client_hs().receive_data(hs.response) == b""


def test_server_byte_at_a_time():
    hs = ServerHandshake(16384)
    data = request()
    for i in range(len(data) - 1):
        assert not hs.receive_data(data[i:i + 1])
    assert hs.receive_data(data[-1:])
    assert hs.accepted


def test_server_lenient_but_correct_tokens():
    hs = serve(request(upgrade="WebSocket", connection="keep-alive, upgrade",
                       proto="other, tunnel.v1", path="/v1/link?agent=1",
                       extra="X-Forwarded-For: 203.0.113.7\r\n"))
    assert hs.accepted
    assert hs.forwarded_for == "203.0.113.7"


@pytest.mark.parametrize("data, status", [
    (request(method="POST"), 400),
    (request(version="HTTP/1.0"), 400),
    (request(host=None), 400),
    (request(key=None), 400),
    (request(key="dG9vc2hvcnQ="), 400),  # 8 bytes
    (request(key="not base64!!"), 400),
    (request(proto=None), 400),
    (request(proto="chat"), 400),
    (request(path="/"), 404),
    (request(path="/v1/linkx"), 404),
    (request(upgrade=None), 426),
    (request(upgrade="h2c"), 426),
    (request(connection=None), 426),
    (request(connection="keep-alive"), 426),
    (request(ws_version="8"), 426),
    (request(ws_version=None), 426),
    (b"GET /v1/link\r\n\r\n", 400),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),
    (b"GET /v1/link HTTP/1.1\r\nHost relay\r\n\r\n", 400),
    (b"GET /v1/link HTTP/1.1\r\n folded: x\r\n\r\n", 400),
])
def test_server_rejections(data, status):
    hs = serve(data)
    assert not hs.accepted
    assert hs.status == status
    head, _, body = hs.response.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode())
    assert b"Connection: close" in head
    assert f"Content-Length: {len(body)}".encode() in head
    assert 0 < len(body) < 200
    if status == 426:
        assert b"Upgrade: websocket" in head or b"Sec-WebSocket-Version: 13" in head


def test_server_header_size_limit():
    hs = ServerHandshake(1024)
    assert not hs.receive_data(b"GET /v1/link HTTP/1.1\r\n")
    assert hs.receive_data(b"X-Pad: " + b"a" * 1100)  # no end of head within the limit
    assert not hs.accepted and hs.status == 431
    hs = serve(request(extra="X-Pad: " + "a" * 1100 + "\r\n"), max_size=1024)
    assert not hs.accepted and hs.status == 431
    assert serve(request(), max_size=len(request())).accepted


# --- frames: receiving -------------------------------------------------------------------

def masked_frame(payload: bytes, opcode: int = 2, fin: bool = True, key: bytes | None = None) -> bytes:
    key = key if key is not None else os.urandom(4)
    return frames.encode_ws_header(opcode, fin, len(payload), key) + frames.ws_mask(payload, key)


def plain_frame(payload: bytes, opcode: int = 2, fin: bool = True) -> bytes:
    return frames.encode_ws_header(opcode, fin, len(payload)) + payload


def server_conn(max_size=MAX) -> WebSocketConnection:
    return WebSocketConnection(client=False, max_frame_size=max_size)


def client_conn(max_size=MAX) -> WebSocketConnection:
    return WebSocketConnection(client=True, max_frame_size=max_size)


def collect(conn, data: bytes, step: int | None = None) -> bytes:
    out = bytearray()
    step = step or len(data) or 1
    for i in range(0, len(data), step):
        for piece in conn.receive_data(data[i:i + step]):
            out += piece
    return bytes(out)


def close_code_of(frame: bytes) -> int:
    """The status code in a close frame we sent (either side's encoding)."""
    parsed = frames.parse_ws_header(frame)
    fin, opcode, length, key, size = parsed
    assert opcode == 8
    payload = frame[size:size + length]
    if key is not None:
        payload = frames.ws_mask(payload, key)
    return struct.unpack("!H", payload[:2])[0] if payload else 1005


def test_rfc_masked_hello():
    # RFC 6455 5.7: a single-frame masked text "Hello" — as binary here (opcode 2).
    data = bytes.fromhex("8285") + bytes.fromhex("37fa213d") + bytes.fromhex("7f9f4d5158")
    assert collect(server_conn(), data) == b"Hello"


@pytest.mark.parametrize("step", [1, 2, 3, 7, 13, 100, None])
def test_server_stream_of_masked_frames_any_split(step):
    payloads = [os.urandom(n) for n in (0, 1, 125, 126, 127, 1000, 65535, 65536, 70000)]
    data = b"".join(masked_frame(p) for p in payloads)
    conn = server_conn()
    assert collect(conn, data, step) == b"".join(payloads)
    assert conn.failure is None and conn.data_to_send() == []


@pytest.mark.parametrize("step", [1, 5, None])
def test_client_stream_of_unmasked_frames_any_split(step):
    payloads = [os.urandom(n) for n in (3, 200, 70000)]
    data = b"".join(plain_frame(p) for p in payloads)
    assert collect(client_conn(), data, step) == b"".join(payloads)


def test_pieces_are_delivered_before_the_frame_ends():
    conn = client_conn()
    payload = os.urandom(100_000)
    frame = plain_frame(payload)
    first = conn.receive_data(frame[:50_000])
    assert sum(len(p) for p in first) == 50_000 - 10
    assert isinstance(first[0], memoryview)  # zero copy for unmasked frames
    rest = conn.receive_data(frame[50_000:])
    assert b"".join(bytes(p) for p in first + rest) == payload


def test_fragmented_binary_message_with_interleaved_ping():
    conn = server_conn()
    data = (masked_frame(b"ab", opcode=2, fin=False) + masked_frame(b"hi", opcode=9)
            + masked_frame(b"cd", opcode=0, fin=False) + masked_frame(b"ef", opcode=0, fin=True))
    assert collect(conn, data, 1) == b"abcdef"
    [pong] = conn.data_to_send()
    assert pong == plain_frame(b"hi", opcode=10)


def test_client_pong_is_masked():
    conn = client_conn()
    assert collect(conn, plain_frame(b"xyz", opcode=9)) == b""
    [pong] = conn.data_to_send()
    fin, opcode, length, key, size = frames.parse_ws_header(pong)
    assert opcode == 10 and key is not None and frames.ws_mask(pong[size:], key) == b"xyz"


def test_pong_is_ignored():
    conn = server_conn()
    assert collect(conn, masked_frame(b"1", opcode=10) + masked_frame(b"data")) == b"data"
    assert conn.data_to_send() == []


@pytest.mark.parametrize("conn_factory, frame, code", [
    (server_conn, plain_frame(b"x"), 1002),  # unmasked from a client
    (client_conn, masked_frame(b"x"), 1002),  # masked from a server
    (server_conn, masked_frame(b"text", opcode=1), 1003),
    (server_conn, masked_frame(b"x", opcode=3), 1002),  # reserved data opcode
    (server_conn, masked_frame(b"x", opcode=0xB), 1002),  # reserved control opcode
    (server_conn, masked_frame(b"x", opcode=0), 1002),  # continuation outside a message
    (server_conn, masked_frame(b"a", fin=False) + masked_frame(b"b"), 1002),  # new message inside one
    (server_conn, bytes([0xC2]) + masked_frame(b"x")[1:], 1002),  # RSV1
    (server_conn, bytes([0x92]) + masked_frame(b"x")[1:], 1002),  # RSV3
    (server_conn, masked_frame(b"p", opcode=9, fin=False), 1002),  # fragmented control
    (server_conn, frames.encode_ws_header(9, True, 126, b"abcd") + b"\0" * 126, 1002),  # long control
    (server_conn, masked_frame(b"\x03", opcode=8), 1002),  # 1-byte close payload
    (server_conn, masked_frame(struct.pack("!H", 999), opcode=8), 1002),
    (server_conn, masked_frame(struct.pack("!H", 1005), opcode=8), 1002),
    (server_conn, masked_frame(struct.pack("!H", 2999), opcode=8), 1002),
    (server_conn, masked_frame(struct.pack("!H", 1000) + b"\xff\xfe", opcode=8), 1007),
    (server_conn, bytes([0x82, 0xFF]) + (1 << 63).to_bytes(8, "big") + b"abcd", 1002),
])
def test_violations_close_with_the_right_code(conn_factory, frame, code):
    for step in (1, None):
        conn = conn_factory()
        collect(conn, frame, step)
        assert conn.failure is not None
        assert conn.state == State.CLOSED
        [close] = conn.data_to_send()
        assert close_code_of(close) == code
        # Later bytes are ignored.
        assert conn.receive_data(masked_frame(b"late")) == []


def test_oversized_frame_is_refused_before_its_payload():
    conn = server_conn(max_size=1000)
    header = frames.encode_ws_header(2, True, 1001, b"abcd")
    assert conn.receive_data(header) == []
    assert conn.failure is not None
    [close] = conn.data_to_send()
    assert close_code_of(close) == CloseCode.MESSAGE_TOO_BIG
    ok = server_conn(max_size=1000)
    assert collect(ok, masked_frame(b"z" * 1000)) == b"z" * 1000


def test_data_before_a_violation_is_still_delivered():
    conn = server_conn()
    got = collect(conn, masked_frame(b"first") + masked_frame(b"t", opcode=1))
    assert got == b"first"
    assert conn.failure


@pytest.mark.parametrize("payload, code, reason", [
    (b"", 1005, ""),
    (struct.pack("!H", 1000), 1000, ""),
    (struct.pack("!H", 1001) + "bye ✓".encode(), 1001, "bye ✓"),
    (struct.pack("!H", 4321), 4321, ""),
])
def test_peer_close_is_echoed(payload, code, reason):
    conn = server_conn()
    got = collect(conn, masked_frame(b"data") + masked_frame(payload, opcode=8) + masked_frame(b"after"))
    assert got == b"data"
    assert conn.close_received and conn.close_code == code and conn.close_reason == reason
    assert conn.state == State.CLOSED and conn.failure is None
    [echo] = conn.data_to_send()
    assert close_code_of(echo) == (code if code != 1005 else 1005)
    assert conn.receive_data(masked_frame(b"more")) == []


def test_local_close_handshake():
    conn = client_conn()
    frame = conn.encode_close(CloseCode.NORMAL, "done")
    fin, opcode, length, key, size = frames.parse_ws_header(frame)
    assert opcode == 8 and key is not None
    assert frames.ws_mask(frame[size:], key) == struct.pack("!H", 1000) + b"done"
    assert conn.state == State.CLOSING
    assert conn.encode_close() == b""  # only once
    # Data still flows until the peer's close arrives; no close echo is sent.
    assert collect(conn, plain_frame(b"late") + plain_frame(struct.pack("!H", 1000), opcode=8)) == b"late"
    assert conn.state == State.CLOSED and conn.data_to_send() == []


def test_no_pong_after_close_sent():
    conn = server_conn()
    conn.encode_close()
    collect(conn, masked_frame(b"p", opcode=9))
    assert conn.data_to_send() == []


# --- frames: sending ---------------------------------------------------------------------

def decode_all(data: bytes, server_side: bool) -> bytes:
    """Decode frames we wrote with the opposite role's parser."""
    conn = WebSocketConnection(client=server_side, max_frame_size=1 << 24)
    got = collect(conn, data)
    assert conn.failure is None
    return got


def test_server_message_is_zero_copy():
    conn = server_conn()
    a, b = os.urandom(1000), bytearray(os.urandom(70000))
    out = conn.encode_message([a, b])
    assert out[1] is a and out[2] is b
    assert out[0] == frames.encode_ws_header(2, True, 71000)
    assert decode_all(b"".join(out), server_side=True) == a + bytes(b)


def test_client_message_is_masked_with_fresh_keys():
    conn = client_conn()
    bufs = [b"hello ", memoryview(b"world")]
    out1 = conn.encode_message(bufs)
    out2 = conn.encode_message(bufs)
    assert len(out1) == 2
    k1 = frames.parse_ws_header(out1[0])[3]
    k2 = frames.parse_ws_header(out2[0])[3]
    assert k1 is not None and k2 is not None and k1 != k2
    assert decode_all(b"".join(out1) + b"".join(out2), server_side=False) == b"hello world" * 2


def test_empty_message_writes_nothing():
    assert client_conn().encode_message([]) == []
    assert server_conn().encode_message([b"", b""]) == []


@pytest.mark.parametrize("client", [True, False])
def test_big_batches_are_split(client):
    conn = WebSocketConnection(client=client, max_frame_size=1 << 24, max_send=1000)
    bufs = [os.urandom(n) for n in (10, 999, 2500, 1, 0, 1490)]
    out = conn.encode_message(bufs)
    data = b"".join(bytes(b) for b in out)
    # every frame at most 1000 bytes of payload
    pos, sizes = 0, []
    while pos < len(data):
        fin, opcode, length, key, size = frames.parse_ws_header(data, pos)
        assert fin and opcode == 2
        sizes.append(length)
        pos += size + length
    assert max(sizes) == 1000 and sum(sizes) == 5000
    assert decode_all(data, server_side=not client) == b"".join(bufs)


def test_ping_encoding():
    assert server_conn().encode_ping(b"x") == plain_frame(b"x", opcode=9)
    with pytest.raises(ValueError):
        server_conn().encode_ping(b"x" * 126)
