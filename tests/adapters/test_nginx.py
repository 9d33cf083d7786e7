"""Our WebSocket client through a real nginx reverse proxy (TLS terminated at nginx) to our
server, with the upstream leg in plain ws:// and re-encrypted https://."""

from __future__ import annotations

import asyncio
import os
import pathlib
import socket
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import uvloop  # noqa: E402

from tests.helpers.nginx import NGINX, nginx_available, start_nginx  # noqa: E402
from tunnel.carriers.pipe import PipeReceiver  # noqa: E402
from tunnel.carriers.wss import open_wss_pipe, serve_wss_pipes  # noqa: E402
from tunnel.core.limits import Limits  # noqa: E402
from tunnel.wire.errors import (
    HandshakeError,  # noqa: E402
    LinkError,  # noqa: E402
)

pytestmark = pytest.mark.skipif(not nginx_available(), reason=f"nginx is not installed at {NGINX}")

LIMITS = Limits()


class Collector(PipeReceiver):
    def __init__(self) -> None:
        self.data = bytearray()
        self.lost = asyncio.get_running_loop().create_future()

    def pipe_data_received(self, data) -> None:
        self.data += data

    def pipe_connection_lost(self, exc) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)

    async def wait_bytes(self, n: int, timeout: float = 60) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.data) < n and not self.lost.done():
            assert loop.time() < deadline, f"only {len(self.data)} of {n} bytes arrived"
            await asyncio.sleep(0.01)
        assert len(self.data) >= n, f"pipe ended after {len(self.data)} of {n}: {self.lost.result()!r}"


def listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


async def exchange(proxy_url: str, sock: socket.socket, pki, upstream_tls: bool) -> None:
    server_pipes: list = []

    def on_pipe(pipe, slot):
        rec = Collector()
        pipe.set_receiver(rec)
        server_pipes.append((pipe, rec))
        slot.release()

    server = await serve_wss_pipes("127.0.0.1", 0, ssl_context=pki.server_context() if upstream_tls else None,
                                   limits=LIMITS, on_pipe=on_pipe, sock=sock)
    try:
        pipe = await open_wss_pipe(proxy_url, ssl_context=pki.client_context(), limits=LIMITS, timeout=30)
        rec = Collector()
        pipe.set_receiver(rec)
        up = os.urandom(8 * 1024 * 1024)
        for i in range(0, len(up), 1 << 20):
            pipe.write([up[i:i + (1 << 19)], up[i + (1 << 19):i + (1 << 20)]])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while not server_pipes:
            assert loop.time() < deadline
            await asyncio.sleep(0.01)
        srv_pipe, srv_rec = server_pipes[0]
        assert srv_pipe.forwarded_for == "127.0.0.1"  # nginx's X-Forwarded-For
        await srv_rec.wait_bytes(len(up))
        assert srv_rec.data == up
        down = os.urandom(8 * 1024 * 1024 + 13)
        for i in range(0, len(down), 1 << 20):
            srv_pipe.write([down[i:i + (1 << 20)]])
        await rec.wait_bytes(len(down))
        assert rec.data == down
        pipe.close()
        assert await asyncio.wait_for(rec.lost, 30) is None
        await asyncio.wait_for(srv_rec.lost, 30)
        # A wrong path is refused by our server (nginx passes the status through).
        with pytest.raises(HandshakeError) as info:
            await open_wss_pipe(proxy_url + "/elsewhere", ssl_context=pki.client_context(),
                                limits=LIMITS, timeout=30)
        assert info.value.status == 404
    finally:
        server.close()


@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
@pytest.mark.parametrize("upstream_tls", [False, True], ids=["ws-upstream", "wss-upstream"])
def test_client_through_nginx(pki, upstream_tls, loop_kind):
    sock = listening_socket()
    port = sock.getsockname()[1]
    with start_nginx(port, pki.cert_file, pki.key_file, upstream_tls=upstream_tls,
                     upstream_ca_file=pki.ca_file if upstream_tls else None) as nginx:
        factory = uvloop.new_event_loop if loop_kind == "uvloop" else asyncio.new_event_loop
        with asyncio.Runner(loop_factory=factory) as runner:
            try:
                runner.run(asyncio.wait_for(exchange(nginx.url, sock, pki, upstream_tls), 180))
            except BaseException:
                print(nginx.logs()[-4000:])
                raise


def test_upstream_down_gives_a_clear_error(pki):
    sock = listening_socket()
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there

    async def main(url):
        with pytest.raises(LinkError) as info:
            await open_wss_pipe(url, ssl_context=pki.client_context(), limits=LIMITS, timeout=30)
        assert isinstance(info.value, HandshakeError) and info.value.status == 502

    with start_nginx(port, pki.cert_file, pki.key_file) as nginx:
        uvloop.run(main(nginx.url))
