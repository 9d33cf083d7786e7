"""Bad input against a live relay: random bytes (TCP and UDP), broken WebSocket framing, bad
upgrades, and protocol violations from an authenticated hand-driven client.

Throughout, a *second customer's* agent moves bytes through its endpoint and every byte is
checked; the relay process stays alive and its memory bounded. (Token refusals are in
tests/e2e/test_tunnel.py and test_isolation.py here.)
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import ssl
import struct
import threading
import time

import pytest

from tests.faults.faultkit import rss_kib, setup_agent
from tests.helpers.processes import connect, recv_all
from tunnel import codec as frames
from tunnel.carriers.base import LinkHandler
from tunnel.core.limits import Limits
from tunnel.wire.constants import ErrorCode, Flags, FrameType
from tunnel.wire.errors import LinkError

#: Growth of the relay's RSS allowed across every attack (buffers of the random floods,
#: allocator high-water marks); a leak per connection or frame would exceed it.
RSS_MARGIN_KIB = 24 * 1024


class Bystander(threading.Thread):
    """The other customer's traffic: a long-lived echo stream plus short ones, all exact."""

    def __init__(self, addr) -> None:
        super().__init__(daemon=True)
        self.addr = addr
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.bytes_ok = 0
        self.rounds = 0

    def run(self) -> None:
        rng = random.Random(1)
        try:
            long = connect(self.addr)
        except OSError as exc:
            self.errors.append(f"connect: {exc!r}")
            return
        with long:
            while not self.stop.is_set() and self.rounds < 100_000:
                chunk = rng.randbytes(rng.randint(1, 8192))
                try:
                    long.sendall(chunk)
                    got = b""
                    while len(got) < len(chunk):
                        piece = long.recv(len(chunk) - len(got))
                        if not piece:
                            raise ConnectionError("EOF on the long-lived stream")
                        got += piece
                    if got != chunk:
                        self.errors.append("long-lived stream: bytes differ")
                        return
                    self.bytes_ok += len(chunk)
                    if self.rounds % 20 == 0:
                        data = rng.randbytes(1000)
                        with connect(self.addr) as s:
                            s.sendall(data)
                            s.shutdown(socket.SHUT_WR)
                            if recv_all(s) != data:
                                self.errors.append("short stream: bytes differ")
                                return
                        self.bytes_ok += len(data)
                except OSError as exc:
                    self.errors.append(f"bystander I/O: {exc!r}")
                    return
                self.rounds += 1

    def progress_during(self, fn):
        """Run ``fn`` and assert the bystander moved exact bytes while it ran."""
        before = self.bytes_ok
        result = fn()
        deadline = time.monotonic() + 10
        while self.bytes_ok == before and time.monotonic() < deadline and not self.errors:
            time.sleep(0.01)  # polling the bystander's counter
        assert not self.errors, self.errors
        assert self.bytes_ok > before, "the other customer's stream stalled"
        return result


# --- hand-driven clients ------------------------------------------------------------------


class Recorder(LinkHandler):
    def __init__(self) -> None:
        self.messages: list[dict] = []
        self.closed: tuple | None = None

    def control_received(self, message):
        self.messages.append(message)

    def link_closed(self, code, reason):
        self.closed = (code, reason)


async def _link(relay, token: str | None):
    from tunnel.carriers.session_link import SessionLink
    from tunnel.carriers.wss import open_wss_pipe
    from tunnel.core.session_state import Role

    ctx = ssl.create_default_context(cafile=relay.ca_file)
    pipe = await open_wss_pipe(f"wss://127.0.0.1:{relay.port}", ssl_context=ctx, limits=Limits(), timeout=10)
    link = SessionLink(pipe, Role.AGENT, Limits())
    rec = Recorder()
    link.set_handler(rec)
    await link.wait_ready()
    if token is not None:
        link.send_control({"type": "auth", "token": token, "agent": {}, "resources": [{"name": "evil"}]})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not rec.messages and rec.closed is None and loop.time() < deadline:
            await asyncio.sleep(0.01)
        assert rec.messages and rec.messages[0]["type"] == "registered", (rec.messages, rec.closed)
    return link, pipe, rec


class RawReceiver:
    """Takes over a pipe after authentication: records the relay's GOAWAY and the end."""

    def __init__(self, loop) -> None:
        self.decoder = frames.FrameDecoder(16 * 1024 * 1024)
        self.goaway: tuple | None = None
        self.resets = 0
        self.lost = loop.create_future()

    def pipe_data_received(self, data) -> None:
        try:
            for ftype, _flags, _sid, payload in self.decoder.feed(data):
                if ftype == FrameType.GOAWAY:
                    _last, code, reason = frames.parse_goaway(payload)
                    self.goaway = (code, reason)
                elif ftype == FrameType.RESET:
                    self.resets += 1
        except Exception:  # noqa: BLE001 - the relay's bytes are not under test here
            pass

    def pipe_pause_writing(self) -> None:
        pass

    def pipe_resume_writing(self) -> None:
        pass

    def pipe_connection_lost(self, exc) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


def _violation(relay, token, frames_out: list[bytes], expect: set[int]) -> tuple:
    """Authenticate (unless token is None), then write raw frames from a pipe no longer
    watched by our own session; expect the relay to send GOAWAY with one of ``expect`` and
    close the connection within 10 s."""
    async def main():
        link, pipe, rec = await _link(relay, token)
        raw = RawReceiver(asyncio.get_running_loop())
        pipe.set_receiver(raw)
        for i in range(0, len(frames_out), 256):
            pipe.write(frames_out[i:i + 256])
            await asyncio.sleep(0)
        try:
            await asyncio.wait_for(asyncio.shield(raw.lost), 10)
        except asyncio.TimeoutError:
            pipe.abort()
            raise AssertionError(f"relay kept the link open after the violation (GOAWAY {raw.goaway})")
        return raw.goaway

    closed = asyncio.run(main())
    assert closed is not None, "the relay closed without a GOAWAY saying why"
    assert closed[0] in expect, f"closed with {closed}, expected one of {expect}"
    return closed


def _ws_frame(opcode: int, payload: bytes, masked: bool = True, fin: bool = True, length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    first = (0x80 if fin else 0) | opcode
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head = struct.pack("!BB", first, mask_bit | n)
    elif n < 65536:
        head = struct.pack("!BBH", first, mask_bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, n)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def _upgraded_socket(relay) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=relay.ca_file)
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", relay.port), timeout=10), server_hostname="127.0.0.1")
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    s.sendall((f"GET /v1/link HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: tunnel.v1\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        piece = s.recv(4096)
        assert piece, "upgrade refused"
        head += piece
    assert head.startswith(b"HTTP/1.1 101"), head[:100]
    return s


def _close_code_or_eof(s: socket.socket) -> int | None:
    """Read until EOF; the WebSocket close code the relay sent, if any."""
    s.settimeout(10)
    data = b""
    try:
        while piece := s.recv(65536):
            data += piece
    except (ConnectionResetError, ssl.SSLError, socket.timeout) as exc:
        if isinstance(exc, socket.timeout):
            raise AssertionError("relay kept a broken WebSocket connection open")
    i = data.find(b"\x88")  # a close frame (FIN + opcode 8), unmasked from the server
    if i >= 0 and i + 4 <= len(data):
        return struct.unpack("!H", data[i + 2:i + 4])[0]
    return None


# --- the test -----------------------------------------------------------------------------


def test_hostile_input_never_harms_the_relay_or_another_customer(relay, agents, service_factory):
    service = service_factory("echo")
    _, _, good_agent, good_addr = setup_agent(relay, agents, service, "wss", customer_name="good")
    attacker = relay.create_customer("attacker")
    token = relay.jwt("--customer-id", attacker)
    bystander = Bystander(good_addr)
    bystander.start()
    pid = relay.proc.pid
    rss_before = rss_kib(pid)
    results: dict[str, object] = {}
    rng = random.Random(42)
    try:
        def random_tcp():
            for _ in range(20):
                with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
                    try:
                        s.sendall(rng.randbytes(rng.randint(1, 65536)))
                        s.settimeout(10)
                        while s.recv(65536):
                            pass
                    except (ConnectionResetError, BrokenPipeError):
                        pass
            return "20 connections closed"
        results["random bytes over TCP"] = bystander.progress_during(random_tcp)

        def random_udp():
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                for i in range(2000):
                    size = rng.choice([1, 20, 1200, 1350, rng.randint(1, 1500)])
                    data = bytearray(rng.randbytes(size))
                    if i % 2 and size >= 1200:
                        data[0] = 0xC0  # long header, Initial: reaches the QUIC header parser
                        data[1:5] = b"\x00\x00\x00\x01"
                    u.sendto(bytes(data), ("127.0.0.1", relay.port))
            return "2000 datagrams"
        results["random datagrams over UDP"] = bystander.progress_during(random_udp)

        def bad_upgrades():
            ctx = ssl.create_default_context(cafile=relay.ca_file)
            answers = []
            for request in (b"GET /v1/link HTTP/1.1\r\nHost: x\r\n\r\n", b"POST / HTTP/1.0\r\n\r\n",
                            b"\x00" * 100 + b"\r\n\r\n", b"GET /v1/link HTTP/1.1\r\n" + b"X: y\r\n" * 5000):
                with ctx.wrap_socket(socket.create_connection(("127.0.0.1", relay.port), timeout=10),
                                     server_hostname="127.0.0.1") as s:
                    try:
                        s.sendall(request)
                    except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
                        pass
                    try:
                        answers.append(recv_all(s)[:12])
                    except (ConnectionResetError, ssl.SSLError):
                        answers.append(b"reset")
            assert all(a.startswith(b"HTTP/1.1 4") or a == b"reset" for a in answers), answers
            return answers
        results["bad upgrade requests"] = bystander.progress_during(bad_upgrades)

        def ws_violations():
            codes = {}
            cases = {
                "oversized frame": _ws_frame(2, b"", length=2**40),
                "text message": _ws_frame(1, b"hello"),
                "unmasked client frame": _ws_frame(2, b"abc", masked=False),
                "reserved opcode": _ws_frame(3, b"abc"),
                "fragmented ping": _ws_frame(9, b"x", fin=False),
            }
            for name, frame in cases.items():
                with _upgraded_socket(relay) as s:
                    s.sendall(frame)
                    codes[name] = _close_code_or_eof(s)
            assert codes["oversized frame"] == 1009, codes
            assert all(c in (1002, 1003, 1009) for c in codes.values()), codes
            with _upgraded_socket(relay) as s:  # truncated: header says 1000 bytes, 10 arrive
                s.sendall(_ws_frame(2, b"x" * 1000)[:16])
                s.shutdown(socket.SHUT_WR)
                codes["truncated frame then EOF"] = _close_code_or_eof(s)
            return codes
        results["invalid WebSocket frames"] = bystander.progress_during(ws_violations)

        enc = frames.encode_frame
        flood_opens = [enc(FrameType.OPEN, 0, 2 * i + 1, b"db") for i in range(30000)]
        violations = {
            "OPEN before auth": (None, [enc(FrameType.OPEN, 0, 1, b"db")], {ErrorCode.PROTOCOL_ERROR}),
            "DATA on a stream never opened": (token, [enc(FrameType.DATA, 0, 1001, b"x")], {ErrorCode.PROTOCOL_ERROR}),
            "session window overflow": (token, [enc(FrameType.WINDOW_UPDATE, 0, 0, frames.encode_u32(2**31 - 1))] * 2,
                                        {ErrorCode.FLOW_CONTROL_ERROR}),
            "frame over max_frame_size": (token, [frames.encode_header(FrameType.DATA, 0, 1, 64 * 1024 * 1024)],
                                          {ErrorCode.FRAME_SIZE_ERROR}),
            "unknown frame type": (token, [b"\x09\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"],
                                   {ErrorCode.PROTOCOL_ERROR}),
            "ping flood": (token, [enc(FrameType.PING, 0, 0, struct.pack("!Q", i)) for i in range(2000)],
                           {ErrorCode.ENHANCE_YOUR_CALM}),
            "stream open flood": (token, flood_opens, {ErrorCode.ENHANCE_YOUR_CALM}),
            "reset flood": (token, [enc(FrameType.RESET, 0, 2 * i + 1, frames.encode_u32(0)) for i in range(30000)],
                            {ErrorCode.ENHANCE_YOUR_CALM, ErrorCode.PROTOCOL_ERROR}),
            "data after reset then bad window": (
                token, [enc(FrameType.OPEN, 0, 1, b"x"), enc(FrameType.RESET, 0, 1, frames.encode_u32(0)),
                        enc(FrameType.DATA, 0, 1, b"late"), enc(FrameType.WINDOW_UPDATE, 0, 0, frames.encode_u32(0))],
                {ErrorCode.PROTOCOL_ERROR, ErrorCode.FLOW_CONTROL_ERROR}),
            "DATA after own FIN": (
                token, [enc(FrameType.OPEN, Flags.FIN, 3, b"x"), enc(FrameType.DATA, 0, 3, b"after fin"),
                        enc(FrameType.DATA, 0, 5, b"x")],
                {ErrorCode.PROTOCOL_ERROR, ErrorCode.STREAM_CLOSED}),
        }
        for name, (tok, out, expect) in violations.items():
            closed = bystander.progress_during(lambda: _violation(relay, tok, out, expect))
            results[name] = f"closed: {ErrorCode(closed[0]).name} {closed[1]!r}"
        for _ in range(3):  # some links, same tricks, repeated: nothing piles up
            bystander.progress_during(lambda: _violation(relay, token, flood_opens, {ErrorCode.ENHANCE_YOUR_CALM}))
    finally:
        bystander.stop.set()
        bystander.join(20)
    for name, result in results.items():
        print(f"{name}: {result}")
    assert not bystander.errors, bystander.errors
    assert relay.proc.alive()
    rss_after = rss_kib(pid)
    print(f"relay RSS {rss_before} -> {rss_after} KiB; bystander moved {bystander.bytes_ok} exact bytes")
    assert rss_after - rss_before <= RSS_MARGIN_KIB
    assert good_agent.alive()
    assert "Traceback" not in relay.proc.log(), relay.proc.log()[-3000:]
