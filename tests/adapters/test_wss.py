"""The TLS WebSocket carrier (tunnel.carriers.wss, tunnel.carriers.proxy) on loopback, under uvloop and stock
asyncio and on both TLS engines: exact bytes both ways, big transfers with backpressure, the handshake deadline and
the pending-handshake cap, garbage input, a CONNECT proxy, interop with the `websockets`
library, and the SessionLink helpers on top."""

from __future__ import annotations

import asyncio
import base64
import os
import pathlib
import ssl
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


from tests.helpers import async_wait_until  # noqa: E402
from tunnel.carriers import tls  # noqa: E402
from tunnel.carriers.pipe import PipeReceiver  # noqa: E402
from tunnel.carriers.proxy import no_proxy_matches, proxy_for, redact  # noqa: E402
from tunnel.carriers.wss import open_wss_pipe, parse_ws_url, serve_wss_pipes  # noqa: E402
from tunnel.core.limits import Limits  # noqa: E402
from tunnel.wire.errors import (
    HandshakeError,  # noqa: E402
    LinkError,  # noqa: E402
)

LIMITS = Limits()


@pytest.fixture(params=["openssl", "ssl"], autouse=True)
def tls_engine(request):
    """Every case on both TLS engines (tunnel.carriers.tls): the default and TUNNEL_TLS_ENGINE=ssl."""
    before = tls.engine()
    tls.select(request.param)
    yield request.param
    tls.select(before)


class Collector(PipeReceiver):
    """Collects received bytes; tracks pause/resume and the end of the pipe."""

    def __init__(self, pipe=None, echo: bool = False) -> None:
        self.pipe = pipe
        self.echo = echo
        self.data = bytearray()
        self.lost = asyncio.get_running_loop().create_future()
        self.paused = False
        self.pauses = 0
        self.resumed = asyncio.Event()
        self.resumed.set()

    def pipe_data_received(self, data) -> None:
        self.data += data
        if self.echo:
            self.pipe.write([bytes(data)])

    def pipe_pause_writing(self) -> None:
        self.paused = True
        self.pauses += 1
        self.resumed.clear()

    def pipe_resume_writing(self) -> None:
        self.paused = False
        self.resumed.set()

    def pipe_connection_lost(self, exc) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)

    async def wait_bytes(self, n: int, timeout: float = 60) -> None:
        await async_wait_until(lambda: len(self.data) >= n or self.lost.done(), timeout, what=f"{n} bytes")
        assert len(self.data) >= n, f"pipe ended after {len(self.data)} of {n} bytes: {self.lost.result()!r}"


async def send_all(pipe, receiver: Collector, data: bytes, chunk: int = 256 * 1024, batch: int = 4) -> None:
    """Write ``data`` as fast as pause_writing allows, ``batch`` buffers per message."""
    view = memoryview(data)
    pos = 0
    while pos < len(view):
        if receiver.paused:
            await receiver.resumed.wait()
        bufs = []
        for _ in range(batch):
            if pos >= len(view):
                break
            bufs.append(view[pos:pos + chunk])
            pos += chunk
        pipe.write(bufs)


class Server:
    """Our WebSocket server on loopback; every pipe gets a Collector (echoing or not)."""

    def __init__(self, pki, limits=LIMITS, tls=True, echo=True, release=True) -> None:
        self.pki, self.limits, self.tls, self.echo, self.release = pki, limits, tls, echo, release
        self.pipes: list = []
        self.receivers: list[Collector] = []
        self.slots: list = []

    def on_pipe(self, pipe, slot) -> None:
        rec = Collector(pipe, echo=self.echo)
        pipe.set_receiver(rec)
        self.pipes.append(pipe)
        self.receivers.append(rec)
        self.slots.append(slot)
        if self.release:
            slot.release()

    async def __aenter__(self):
        ctx = self.pki.server_context() if self.tls else None
        self.server = await serve_wss_pipes("127.0.0.1", 0, ssl_context=ctx, limits=self.limits,
                                            on_pipe=self.on_pipe)
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = f"{'wss' if self.tls else 'ws'}://localhost:{self.port}"
        return self

    async def __aexit__(self, *exc):
        for pipe in self.pipes:
            pipe.abort()
        self.server.close()


async def connect(server: Server, pki, **kw):
    ctx = pki.client_context() if server.tls else None
    pipe = await open_wss_pipe(server.url, ssl_context=ctx, limits=kw.pop("limits", LIMITS),
                               timeout=kw.pop("timeout", 30), **kw)
    rec = Collector(pipe)
    pipe.set_receiver(rec)
    return pipe, rec


async def read_until_closed(reader: asyncio.StreamReader, timeout: float = 30) -> bytes:
    """Everything the peer sends until it closes (a reset counts as closed)."""
    out = bytearray()
    async with asyncio.timeout(timeout):
        try:
            while chunk := await reader.read(65536):
                out += chunk
        except (ConnectionError, ssl.SSLError, OSError):
            pass
    return bytes(out)


# --- data transfer ----------------------------------------------------------------------

@pytest.mark.parametrize("tls", [True, False])
def test_small_messages_echo_exactly(run, pki, tls):
    async def main():
        async with Server(pki, tls=tls) as server:
            pipe, rec = await connect(server, pki)
            assert pipe.subprotocol == "tunnel.v1"
            sent = bytearray()
            for n in (1, 2, 125, 126, 127, 65535, 65536, 65537, 3):
                piece = os.urandom(n)
                pipe.write([piece[:n // 2], memoryview(piece)[n // 2:]])
                sent += piece
            await rec.wait_bytes(len(sent))
            assert rec.data == sent
            assert server.pipes[0].peer_address[0] == "127.0.0.1"
            pipe.close()
            assert await asyncio.wait_for(rec.lost, 30) is None
            assert await asyncio.wait_for(server.receivers[0].lost, 30) is None
    run(main())


def test_big_transfer_both_directions_with_backpressure(run, pki):
    size = 24 * 1024 * 1024

    async def main():
        async with Server(pki, echo=False) as server:
            pipe, rec = await connect(server, pki)
            up = os.urandom(size)
            await send_all(pipe, rec, up)  # client -> server, masked
            srv_rec = server.receivers[0]
            await srv_rec.wait_bytes(size)
            assert srv_rec.data == up
            down = os.urandom(size)
            await send_all(server.pipes[0], srv_rec, down)  # server -> client
            await rec.wait_bytes(size)
            assert rec.data == down
            assert rec.pauses + srv_rec.pauses > 0  # the writers really were throttled
    run(main(), timeout=300)


def test_receiver_set_late_gets_early_bytes(run, pki):
    async def main():
        held = []

        class Late(Server):
            def on_pipe(self, pipe, slot):
                held.append(pipe)
                slot.release()

        async with Late(pki) as server:
            pipe, rec = await connect(server, pki)
            pipe.write([b"early bytes"])
            await async_wait_until(lambda: held, what="server pipe")
            server_pipe = held[0]
            await async_wait_until(lambda: server_pipe._early, what="early data")
            late = Collector(server_pipe)
            server_pipe.set_receiver(late)
            assert late.data == b"early bytes"
            pipe.write([b" and more"])
            await late.wait_bytes(20)
            assert late.data == b"early bytes and more"
            pipe.abort()
            server_pipe.abort()
    run(main())


# --- handshake deadline and cap ---------------------------------------------------------

def test_deadline_cuts_idle_tcp_before_tls(run, pki):
    limits = Limits(handshake_timeout=0.5)

    async def main():
        async with Server(pki, limits=limits) as server:
            loop = asyncio.get_running_loop()
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            start = loop.time()
            assert await read_until_closed(reader) == b""
            assert loop.time() - start >= 0.4
            writer.close()
            # Still serving.
            pipe, rec = await connect(server, pki)
            pipe.write([b"ok"])
            await rec.wait_bytes(2)
            pipe.abort()
    run(main())


def test_deadline_cuts_client_stalled_after_tls_and_after_upgrade(run, pki):
    limits = Limits(handshake_timeout=0.5)

    async def main():
        async with Server(pki, limits=limits, release=False) as server:
            loop = asyncio.get_running_loop()
            # Stalls after TLS: never sends the upgrade request.
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", server.port, ssl=pki.client_context(), server_hostname="localhost")
            start = loop.time()
            assert await read_until_closed(reader) == b""
            assert loop.time() - start >= 0.3
            writer.close()
            # Upgrades, but the slot is never released (no authentication): cut too.
            pipe, rec = await connect(server, pki)
            exc = await asyncio.wait_for(rec.lost, 30)
            assert exc is not None
            srv_exc = await asyncio.wait_for(server.receivers[0].lost, 30)
            assert isinstance(srv_exc, LinkError) and "deadline" in str(srv_exc)
    run(main())


def test_released_slot_survives_the_deadline(run, pki):
    limits = Limits(handshake_timeout=0.5)

    async def main():
        async with Server(pki, limits=limits, release=False) as server:
            kept, kept_rec = await connect(server, pki)
            server.slots[0].release()
            witness, witness_rec = await connect(server, pki)  # never released
            await asyncio.wait_for(witness_rec.lost, 30)  # the deadline has passed for both
            kept.write([b"still here"])
            await kept_rec.wait_bytes(10)
            assert kept_rec.data == b"still here"
            assert not kept_rec.lost.done()
            kept.abort()
    run(main())


def test_pending_handshake_cap(run, pki):
    limits = Limits(handshake_timeout=30.0, max_pending_handshakes=2)

    async def main():
        async with Server(pki, limits=limits) as server:
            idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
            # Accepts are handled in order: the third is over the cap and closed at once.
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            assert await read_until_closed(reader, timeout=10) == b""
            writer.close()
            # Free one slot; a real client gets through again (once the server noticed).
            idle[0][1].close()

            async def try_connect():
                try:
                    pipe, rec = await connect(server, pki, timeout=5)
                except LinkError:
                    return None
                return pipe

            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            pipe = None
            while pipe is None and loop.time() < deadline:
                pipe = await try_connect()
            assert pipe is not None
            pipe.abort()
            for _, w in idle[1:]:
                w.close()
    run(main())


# --- bad input --------------------------------------------------------------------------

@pytest.mark.parametrize("tls", [True, False])
def test_bad_upgrade_requests_get_http_errors(run, pki, tls):
    cases = [
        (b"garbage garbage\r\n\r\n", b"HTTP/1.1 400 "),
        (b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", b"HTTP/1.1 404 "),
        (b"GET /v1/link HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 426 "),
        (b"X" * 20000, b"HTTP/1.1 431 "),
    ]

    async def main():
        async with Server(pki, tls=tls) as server:
            for request, expected in cases:
                kw = dict(ssl=pki.client_context(), server_hostname="localhost") if tls else {}
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port, **kw)
                writer.write(request)
                answer = await read_until_closed(reader)
                assert answer.startswith(expected), answer[:80]
                writer.close()
            assert server.pipes == []
            pipe, rec = await connect(server, pki)  # the server lives on
            pipe.write([b"x"])
            await rec.wait_bytes(1)
            pipe.abort()
    run(main())


def test_plaintext_to_tls_port_and_tls_garbage(run, pki):
    async def main():
        async with Server(pki) as server:
            for junk in (b"GET /v1/link HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01\xff\xff" + os.urandom(300)):
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(junk)
                await read_until_closed(reader)
                writer.close()
            pipe, rec = await connect(server, pki)
            pipe.write([b"alive"])
            await rec.wait_bytes(5)
            pipe.abort()
    run(main())


def test_protocol_violation_from_peer_closes_with_error(run, pki):
    async def main():
        async with Server(pki) as server:
            pipe, rec = await connect(server, pki)
            # A text frame (masked, as a client must): the server closes with 1003.
            pipe.transport.write(b"\x81\x82abcd" + bytes(b ^ k for b, k in zip(b"hi", b"abcd")))
            exc = await asyncio.wait_for(rec.lost, 30)
            assert isinstance(exc, LinkError) and "1003" in str(exc)
            srv_exc = await asyncio.wait_for(server.receivers[0].lost, 30)
            assert isinstance(srv_exc, LinkError)
    run(main())


def test_client_errors(run, pki):
    async def main():
        async with Server(pki) as server:
            # Untrusted certificate.
            with pytest.raises(LinkError):
                await open_wss_pipe(server.url, ssl_context=ssl.create_default_context(),
                                    limits=LIMITS, timeout=10)
            # Name mismatch: the certificate is for localhost/127.0.0.1/::1 only.
            ctx = pki.client_context()
            with pytest.raises(LinkError):
                await open_wss_pipe(f"wss://127.0.0.2:{server.port}", ssl_context=ctx, limits=LIMITS, timeout=10)
            # Wrong path: 404.
            with pytest.raises(HandshakeError) as info:
                await open_wss_pipe(server.url + "/nope", ssl_context=ctx, limits=LIMITS, timeout=10)
            assert info.value.status == 404
        # Nothing listening.
        with pytest.raises(LinkError):
            await open_wss_pipe(f"wss://127.0.0.1:{server.port}", ssl_context=ctx, limits=LIMITS, timeout=10)
    run(main())


def test_parse_ws_url():
    assert parse_ws_url("wss://relay.example") == ("wss", "relay.example", 443, "/v1/link")
    assert parse_ws_url("ws://h:8080/x?y=1") == ("ws", "h", 8080, "/x?y=1")
    assert parse_ws_url("wss://[::1]:9") == ("wss", "::1", 9, "/v1/link")
    for bad in ("https://h", "wss://", "quic://h:1"):
        with pytest.raises(ValueError):
            parse_ws_url(bad)


# --- proxy ------------------------------------------------------------------------------

@pytest.mark.parametrize("no_proxy, host, port, exempt", [
    ("", "relay.example.com", 443, False),
    ("*", "relay.example.com", 443, True),
    ("example.com", "example.com", 443, True),
    ("example.com", "relay.example.com", 443, True),
    (".example.com", "relay.example.com", 443, True),
    (".example.com", "example.com", 443, True),
    ("*.example.com", "a.b.example.com", 443, True),
    ("example.com", "badexample.com", 443, False),
    ("EXAMPLE.com.", "Relay.Example.COM", 443, True),
    ("other.org, example.com", "relay.example.com", 443, True),
    ("other.org example.com", "relay.example.com", 443, True),
    ("relay.example.com:443", "relay.example.com", 443, True),
    ("relay.example.com:8443", "relay.example.com", 443, False),
    ("10.1.2.3", "10.1.2.3", 443, True),
    ("10.1.2.3", "10.1.2.4", 443, False),
    ("10.0.0.0/8", "10.200.1.1", 443, True),
    ("10.0.0.0/8", "11.0.0.1", 443, False),
    ("10.0.0.0/8", "ten.example", 443, False),
    ("::1", "::1", 443, True),
    ("[::1]:443", "::1", 443, True),
    ("fd00::/8", "fd12::5", 443, True),
    ("localhost", "127.0.0.1", 443, False),
])
def test_no_proxy_matching(no_proxy, host, port, exempt):
    assert no_proxy_matches(no_proxy, host, port) is exempt


def test_proxy_for_environment():
    env = {"HTTPS_PROXY": "http://u:p@proxy:3128", "NO_PROXY": "internal"}
    assert proxy_for("relay.example", 443, env) == "http://u:p@proxy:3128"
    assert proxy_for("x.internal", 443, env) is None
    assert proxy_for("relay.example", 443, {}) is None
    assert proxy_for("relay.example", 443, {"https_proxy": "proxy:8080"}) == "http://proxy:8080"
    # Lower case wins, as in curl.
    env = {"https_proxy": "http://low:1", "HTTPS_PROXY": "http://up:2", "no_proxy": "", "NO_PROXY": "*"}
    assert proxy_for("relay", 443, env) == "http://low:1"
    assert redact("http://user:secret@proxy:3128") == "http://proxy:3128"


class ConnectProxy:
    """A tiny HTTP CONNECT proxy that records the requests it gets."""

    def __init__(self, credentials: str | None = None) -> None:
        self.credentials = credentials
        self.requests: list[str] = []

    async def __aenter__(self):
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        self.tasks: set = set()
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        for task in self.tasks:
            task.cancel()

    async def handle(self, reader, writer):
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        self.requests.append(head)
        method, target, _ = head.split("\r\n", 1)[0].split(" ")
        if self.credentials is not None:
            token = base64.b64encode(self.credentials.encode()).decode()
            if f"Proxy-Authorization: Basic {token}\r\n" not in head:
                writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                             b"Proxy-Authenticate: Basic realm=x\r\nContent-Length: 0\r\n\r\n")
                writer.close()
                return
        host, port = target.rsplit(":", 1)
        up_reader, up_writer = await asyncio.open_connection(host.strip("[]"), int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

        async def pump(src, dst):
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        for task in (asyncio.ensure_future(pump(reader, up_writer)), asyncio.ensure_future(pump(up_reader, writer))):
            self.tasks.add(task)


def test_connect_proxy_with_and_without_no_proxy(run, pki):
    async def main():
        async with Server(pki) as server, ConnectProxy("agent:s3cr:t") as proxy:
            env = {"HTTPS_PROXY": f"http://agent:s3cr%3At@127.0.0.1:{proxy.port}"}
            url_proxy = proxy_for("localhost", server.port, env)
            assert url_proxy is not None
            pipe, rec = await connect(server, pki, proxy=url_proxy)
            data = os.urandom(300_000)
            pipe.write([data])
            await rec.wait_bytes(len(data))
            assert rec.data == data
            pipe.close()
            [request] = proxy.requests
            assert request.startswith(f"CONNECT localhost:{server.port} HTTP/1.1\r\n")
            # NO_PROXY exempts the relay: a direct connection, the proxy sees nothing new.
            env["NO_PROXY"] = "localhost"
            assert proxy_for("localhost", server.port, env) is None
            pipe, rec = await connect(server, pki, proxy=proxy_for("localhost", server.port, env))
            pipe.write([b"direct"])
            await rec.wait_bytes(6)
            pipe.abort()
            assert len(proxy.requests) == 1
            # Wrong credentials: a 407, and the secret is in no error message.
            bad = f"http://agent:wrong-secret@127.0.0.1:{proxy.port}"
            with pytest.raises(LinkError) as info:
                await connect(server, pki, proxy=bad)
            assert "407" in str(info.value) and "wrong-secret" not in str(info.value)
            # A dead proxy.
            with pytest.raises(LinkError) as info:
                await connect(server, pki, proxy="http://user:hunter2@127.0.0.1:1")
            assert "hunter2" not in str(info.value)
    run(main())


# --- interop with the websockets library ------------------------------------------------

def test_websockets_client_against_our_server(run, pki):
    ws_client = pytest.importorskip("websockets.asyncio.client")
    exceptions = pytest.importorskip("websockets.exceptions")

    async def main():
        async with Server(pki) as server:
            url = f"wss://localhost:{server.port}/v1/link"
            async with ws_client.connect(url, ssl=pki.client_context(), subprotocols=["tunnel.v1"],
                                         max_size=None, compression=None) as ws:
                assert ws.subprotocol == "tunnel.v1"
                payloads = [os.urandom(n) for n in (1, 200, 70000, 2_000_000)]
                for p in payloads:
                    await ws.send(p)
                got = bytearray()
                while len(got) < sum(map(len, payloads)):
                    msg = await asyncio.wait_for(ws.recv(), 30)
                    assert isinstance(msg, bytes)
                    got += msg
                assert got == b"".join(payloads)
                await ws.ping()  # answered by our server
            # Text is refused with 1003.
            async with ws_client.connect(url, ssl=pki.client_context(), subprotocols=["tunnel.v1"]) as ws:
                await ws.send("text")
                with pytest.raises(exceptions.ConnectionClosed) as info:
                    await asyncio.wait_for(ws.recv(), 30)
                assert info.value.rcvd.code == 1003
            # Without our subprotocol: refused.
            with pytest.raises(exceptions.InvalidStatus) as info:
                async with ws_client.connect(url, ssl=pki.client_context()):
                    pass
            assert info.value.response.status_code == 400
    run(main())


def test_our_client_against_websockets_server(run, pki):
    ws_server = pytest.importorskip("websockets.asyncio.server")

    async def main():
        seen = {}

        async def handler(ws):
            seen["subprotocol"] = ws.subprotocol
            seen["path"] = ws.request.path
            async for msg in ws:
                assert isinstance(msg, bytes)
                await ws.send(msg)

        async with ws_server.serve(handler, "127.0.0.1", 0, ssl=pki.server_context(),
                                   subprotocols=["tunnel.v1"], max_size=None, compression=None) as srv:
            port = srv.sockets[0].getsockname()[1]
            pipe = await open_wss_pipe(f"wss://localhost:{port}", ssl_context=pki.client_context(),
                                       limits=LIMITS, timeout=30)
            rec = Collector(pipe)
            pipe.set_receiver(rec)
            data = os.urandom(3_000_000)
            await send_all(pipe, rec, data, chunk=100_000, batch=3)
            await rec.wait_bytes(len(data))
            assert rec.data == data
            assert seen == {"subprotocol": "tunnel.v1", "path": "/v1/link"}
            pipe.close()
            assert await asyncio.wait_for(rec.lost, 30) is None
    run(main())


# --- SessionLink helpers ----------------------------------------------------------------

def test_connect_and_serve_wss_links(run, pki):
    pytest.importorskip("tunnel.carriers.session_link")
    from tunnel.carriers.base import LinkHandler
    from tunnel.carriers.wss import connect_wss, serve_wss

    async def main():
        got = asyncio.get_running_loop().create_future()
        links = []

        class Handler(LinkHandler):
            def control_received(self, message):
                if not got.done():
                    got.set_result(message)

        def on_link(link):
            links.append(link)
            link.set_handler(Handler())
            link.handshake_done()

        server = await serve_wss("127.0.0.1", 0, ssl_context=pki.server_context(), limits=LIMITS, on_link=on_link)
        port = server.sockets[0].getsockname()[1]
        try:
            link = await connect_wss(f"wss://localhost:{port}", ssl_context=pki.client_context(),
                                     limits=LIMITS, timeout=30)
            assert link.carrier == "wss"
            link.send_control({"type": "hello-test", "n": 1})
            assert await asyncio.wait_for(got, 30) == {"type": "hello-test", "n": 1}
            assert links[0].carrier == "wss"
            link.close()
            await asyncio.wait_for(link.wait_closed(), 30)
            await asyncio.wait_for(links[0].wait_closed(), 30)
        finally:
            server.close()
    run(main())


# --- the kernel's unsent queue ----------------------------------------------------------

@pytest.mark.parametrize("lowat", [64 * 1024, 0])
def test_link_socket_bounds_unsent_bytes_in_the_kernel(run, pki, lowat):
    """TCP_NOTSENT_LOWAT on both ends of the link (Limits.link_notsent_lowat; 0: the kernel's)."""
    import dataclasses
    import socket

    limits = dataclasses.replace(LIMITS, link_notsent_lowat=lowat)

    def unsent_bound(pipe) -> int:
        sock = pipe.transport.get_extra_info("socket")
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT)

    async def main():
        with socket.socket() as probe:
            default = probe.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT)
        async with Server(pki, limits=limits) as server:
            pipe, rec = await connect(server, pki, limits=limits)
            pipe.write([b"x"])
            await async_wait_until(lambda: server.receivers and server.receivers[0].data, what="a byte")
            assert unsent_bound(pipe) == unsent_bound(server.pipes[0]) == (lowat or default)
            pipe.abort()
    run(main())
