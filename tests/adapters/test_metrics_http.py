"""The /metrics, /live and /ready server (tunnel.ops.metrics_http) on uvloop and asyncio:
answers, bad requests, and its bounds (request head size, deadline, connections at once)."""

from __future__ import annotations

import asyncio

from tunnel.core.limits import Limits
from tunnel.ops.metrics_http import serve_ops


async def _request(port: int, raw: bytes) -> tuple[int, dict, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def _get(port: int, path: str, method: str = "GET"):
    return _request(port, f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())


def test_endpoints(run, cleanup):
    state = {"ready": "not registered with the relay (connecting)"}

    async def ready():  # a coroutine, as the relay's state check is
        return state["ready"]

    async def main():
        server = await serve_ops("127.0.0.1", 0, render=lambda: b"x_total 1\n", ready=ready, limits=Limits())
        cleanup.append(server.close)
        status, headers, body = await _get(server.port, "/metrics")
        assert (status, body) == (200, b"x_total 1\n")
        assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert headers["Content-Length"] == "10" and headers["Connection"] == "close"
        assert (await _get(server.port, "/metrics", "HEAD"))[::2] == (200, b"")
        assert (await _get(server.port, "/live"))[::2] == (200, b"live\n")
        assert (await _get(server.port, "/ready"))[::2] == (503, b"not ready: not registered with the relay (connecting)\n")
        state["ready"] = None
        assert (await _get(server.port, "/ready?verbose=1"))[::2] == (200, b"ready\n")
        assert (await _get(server.port, "/nothing"))[0] == 404
        status, headers, _ = await _get(server.port, "/metrics", "POST")
        assert status == 405 and headers["Allow"] == "GET, HEAD"
        assert (await _request(server.port, b"nonsense\r\n\r\n"))[0] == 400

    run(main())


def test_a_failing_collector_closes_that_connection_only(run, cleanup):
    calls = []

    def render() -> bytes:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return b"ok\n"

    async def main():
        server = await serve_ops("127.0.0.1", 0, render=render, ready=lambda: None, limits=Limits())
        cleanup.append(server.close)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /metrics HTTP/1.1\r\n\r\n")
        assert await reader.read() == b""
        writer.close()
        assert (await _get(server.port, "/metrics"))[::2] == (200, b"ok\n")

    run(main())


def test_bounds(run, cleanup):
    limits = Limits().replace(handshake_timeout=0.5, max_http_header_size=1024)

    async def main():
        loop = asyncio.get_running_loop()
        server = await serve_ops("127.0.0.1", 0, render=lambda: b"", ready=lambda: None, limits=limits,
                                 max_connections=2)
        cleanup.append(server.close)
        # A head beyond max_http_header_size: 431, nothing more read.
        status, _, _ = await _request(server.port, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 2048 + b"\r\n\r\n")
        assert status == 431
        # Two idle connections take both places; a third is closed at once.
        idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
        while server.connections < 2:
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        assert await asyncio.wait_for(reader.read(), 0.4) == b""  # well before the idle ones time out
        writer.close()
        # The idle ones are closed by the deadline, and the server serves again.
        started = loop.time()
        for idle_reader, idle_writer in idle:
            assert await asyncio.wait_for(idle_reader.read(), 5) == b""
            idle_writer.close()
        assert loop.time() - started < 2
        assert (await _get(server.port, "/live"))[0] == 200

    run(main())
