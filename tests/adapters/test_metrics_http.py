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
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
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
        # Two idle connections take both places; a request on a third closes the older one
        # and is served.
        idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
        while server.connections < 2:
            await asyncio.sleep(0.01)
        assert (await _get(server.port, "/live"))[0] == 200
        assert await asyncio.wait_for(idle[0][0].read(), 0.4) == b""  # well before its deadline
        # The other is closed by the deadline, and the server serves again.
        started = loop.time()
        assert await asyncio.wait_for(idle[1][0].read(), 5) == b""
        assert loop.time() - started < 2
        for _, idle_writer in idle:
            idle_writer.close()
        assert (await _get(server.port, "/live"))[0] == 200

    run(main())


async def _wait_for(condition, timeout: float = 10) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def _open(port: int, host: str = "127.0.0.1", data: bytes = b""):
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(host, 0))
    if data:
        writer.write(data)
    return reader, writer


def test_slowloris_cannot_keep_probes_out(run, cleanup):
    # Issue 20's report: half-sent requests, renewed before the deadline, and idle connections
    # left /ready answering 1 probe in 36. Every probe is answered now.
    limits = Limits().replace(handshake_timeout=5.0)

    async def main():
        server = await serve_ops("127.0.0.1", 0, render=lambda: b"", ready=lambda: None, limits=limits,
                                 max_connections=4)
        cleanup.append(server.close)
        attackers = []
        for round_ in range(3):
            for i in range(8):  # twice the places, from two addresses: half-sent and idle
                data = b"GET /ready HTTP/1.1\r\nHost: x\r\nX-Slow: " if i % 2 else b""
                attackers.append(await _open(server.port, f"127.0.0.{2 + i % 2}", data))
            await _wait_for(lambda: server.connections == 4)
            for path in ("/ready", "/live"):
                assert (await _get(server.port, path))[0] == 200, (round_, path)
        for _, writer in attackers:
            writer.close()

    run(main())


def test_one_address_cannot_take_every_place(run, cleanup):
    limits = Limits().replace(handshake_timeout=5.0)

    async def main():
        server = await serve_ops("127.0.0.1", 0, render=lambda: b"", ready=lambda: None, limits=limits,
                                 max_connections=4)
        cleanup.append(server.close)
        greedy = [await _open(server.port, "127.0.0.2") for _ in range(6)]
        await _wait_for(lambda: server.connections == 2)  # half of the places at most
        reader, writer = await _open(server.port, "127.0.0.3")
        greedy += [await _open(server.port, "127.0.0.2") for _ in range(6)]
        await _wait_for(lambda: server.connections == 3)
        # The other address's connection was never closed for the greedy one's.
        writer.write(b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 200 ")
        for _, greedy_writer in greedy:
            greedy_writer.close()

    run(main())


def test_pipelined_requests_get_one_answer_and_the_close(run, cleanup):
    async def main():
        server = await serve_ops("127.0.0.1", 0, render=lambda: b"", ready=lambda: "starting", limits=Limits())
        cleanup.append(server.close)
        status, headers, body = await _request(
            server.port, b"GET /live HTTP/1.1\r\nHost: x\r\n\r\nGET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (status, body, headers["Connection"]) == (200, b"live\n", "close")

    run(main())


def test_framing_tricks_are_refused(run, cleanup):
    async def main():
        server = await serve_ops("127.0.0.1", 0, render=lambda: b"", ready=lambda: None, limits=Limits())
        cleanup.append(server.close)
        for framing in (b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n", b"Content-Length: 3, 4\r\n",
                        b"Content-Length: 3\r\nContent-Length: 4\r\n"):
            assert (await _request(server.port, b"GET /live HTTP/1.1\r\nHost: x\r\n" + framing + b"\r\n0\r\n\r\n"))[0] \
                == 400, framing
        flood = b"".join(b"X-%d: v\r\n" % i for i in range(4000))
        assert (await _request(server.port, b"GET /live HTTP/1.1\r\nHost: x\r\n" + flood + b"\r\n"))[0] == 431

    run(main())
