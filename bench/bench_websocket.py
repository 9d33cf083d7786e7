"""Throughput of our TLS WebSocket pipe (tunnel.carriers.wss) against picows and websockets.

One direction at a time over TLS on loopback (client -> server: masked; server -> client:
unmasked), both ends in this process on one uvloop loop, so the figure is the CPU cost of
both ends together. Each library sends the same payload in messages of the same size as fast
as its flow control allows; the receiver counts bytes. Prints MB/s (best of --repeat).

    python bench/bench_websocket.py [--mbytes 256] [--sizes 16384,262144] [--repeat 3]

picows and websockets are optional (pip install picows websockets); missing ones are skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import ssl
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import uvloop  # noqa: E402

from tests.helpers import make_pki  # noqa: E402
from tunnel import codec as frames  # noqa: E402
from tunnel.carriers.pipe import PipeReceiver  # noqa: E402
from tunnel.carriers.wss import open_wss_pipe, serve_wss_pipes  # noqa: E402
from tunnel.core.limits import Limits  # noqa: E402

LIMITS = Limits()


class _Counter(PipeReceiver):
    def __init__(self, total: int) -> None:
        self.total = total
        self.got = 0
        self.done = asyncio.get_running_loop().create_future()
        self.resumed = asyncio.Event()
        self.resumed.set()

    def pipe_data_received(self, data) -> None:
        self.got += len(data)
        if self.got >= self.total and not self.done.done():
            self.done.set_result(time.perf_counter())

    def pipe_pause_writing(self) -> None:
        self.resumed.clear()

    def pipe_resume_writing(self) -> None:
        self.resumed.set()


async def _send_pipe(pipe, counter: _Counter, total: int, payload: bytes) -> None:
    sent = 0
    while sent < total:
        if not counter.resumed.is_set():
            await counter.resumed.wait()
        pipe.write([payload])
        sent += len(payload)


async def bench_ours(server_ctx, client_ctx, total: int, size: int, upload: bool) -> float:
    payload = os.urandom(size)
    total = total // size * size
    accepted = asyncio.get_running_loop().create_future()

    def on_pipe(pipe, slot):
        counter = _Counter(total)
        pipe.set_receiver(counter)
        slot.release()
        accepted.set_result((pipe, counter))

    server = await serve_wss_pipes("127.0.0.1", 0, ssl_context=server_ctx, limits=LIMITS, on_pipe=on_pipe)
    port = server.sockets[0].getsockname()[1]
    pipe = await open_wss_pipe(f"wss://localhost:{port}", ssl_context=client_ctx, limits=LIMITS, timeout=10)
    client_counter = _Counter(total)
    pipe.set_receiver(client_counter)
    srv_pipe, srv_counter = await accepted
    start = time.perf_counter()
    if upload:
        await _send_pipe(pipe, client_counter, total, payload)
        end = await srv_counter.done
    else:
        await _send_pipe(srv_pipe, srv_counter, total, payload)
        end = await client_counter.done
    pipe.abort()
    srv_pipe.abort()
    server.close()
    return total / (end - start)


async def bench_ours_aiofastnet(server_ctx, client_ctx, total: int, size: int, upload: bool) -> float:
    """Ours, with the loop's TLS transports swapped for aiofastnet's (what picows uses)."""
    import aiofastnet

    aiofastnet.patch_loop(asyncio.get_running_loop())
    return await bench_ours(server_ctx, client_ctx, total, size, upload)


async def bench_picows_plain(server_ctx, client_ctx, total: int, size: int, upload: bool) -> float:
    """picows on uvloop's own TLS transport (no aiofastnet)."""
    return await bench_picows(server_ctx, client_ctx, total, size, upload, use_aiofastnet=False)


async def bench_picows(server_ctx, client_ctx, total: int, size: int, upload: bool,
                       use_aiofastnet: bool | None = None) -> float:
    import picows

    payload = os.urandom(size)
    total = total // size * size
    loop = asyncio.get_running_loop()

    class Listener(picows.WSListener):
        def __init__(self) -> None:
            self.transport = None
            self.got = 0
            self.done = loop.create_future()
            self.connected = loop.create_future()
            self.resumed = asyncio.Event()
            self.resumed.set()

        def on_ws_connected(self, transport):
            self.transport = transport
            self.connected.set_result(transport)

        def on_ws_frame(self, transport, frame):
            if frame.msg_type == picows.WSMsgType.BINARY:
                self.got += frame.payload_size
                if self.got >= total and not self.done.done():
                    self.done.set_result(time.perf_counter())

        def pause_writing(self):
            self.resumed.clear()

        def resume_writing(self):
            self.resumed.set()

    server_listeners = []

    def factory(request):
        listener = Listener()
        server_listeners.append(listener)
        return listener

    server = await picows.ws_create_server(factory, "127.0.0.1", 0, ssl=server_ctx, max_frame_size=1 << 24,
                                           use_aiofastnet=use_aiofastnet)
    port = server.sockets[0].getsockname()[1]
    transport, client = await picows.ws_connect(Listener, f"wss://localhost:{port}/", ssl_context=client_ctx,
                                                max_frame_size=1 << 24, use_aiofastnet=use_aiofastnet)
    await client.connected
    srv = server_listeners[0]
    await srv.connected
    sender, receiver = (client, srv) if upload else (srv, client)
    start = time.perf_counter()
    sent = 0
    while sent < total:
        if not sender.resumed.is_set():
            await sender.resumed.wait()
        sender.transport.send(picows.WSMsgType.BINARY, payload)
        sent += size
    end = await receiver.done
    transport.disconnect()
    srv.transport.disconnect()
    server.close()
    return total / (end - start)


async def bench_websockets(server_ctx, client_ctx, total: int, size: int, upload: bool) -> float:
    from websockets.asyncio.client import connect
    from websockets.asyncio.server import serve

    payload = os.urandom(size)
    total = total // size * size
    loop = asyncio.get_running_loop()
    server_ws = loop.create_future()
    finished = loop.create_future()

    async def receive(ws):
        got = 0
        async for msg in ws:
            got += len(msg)
            if got >= total:
                return time.perf_counter()

    async def handler(ws):
        server_ws.set_result(ws)
        await finished

    async with serve(handler, "127.0.0.1", 0, ssl=server_ctx, max_size=None, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"wss://localhost:{port}/", ssl=client_ctx, max_size=None, compression=None) as ws:
            srv = await server_ws
            sender, receiver = (ws, srv) if upload else (srv, ws)
            recv_task = asyncio.ensure_future(receive(receiver))
            start = time.perf_counter()
            sent = 0
            while sent < total:
                await sender.send(payload)
                sent += size
            end = await recv_task
            finished.set_result(None)
    return total / (end - start)


LIBRARIES = {
    "tunnel.carriers.wss": bench_ours,
    "tunnel.carriers.wss+afn": bench_ours_aiofastnet,
    "picows": bench_picows,  # uses aiofastnet's TLS transport when installed (its default)
    "picows-uvtls": bench_picows_plain,
    "websockets": bench_websockets,
}
MODULES = {"tunnel.carriers.wss": "tunnel.carriers.wss", "tunnel.carriers.wss+afn": "aiofastnet", "picows": "picows",
           "picows-uvtls": "picows", "websockets": "websockets.asyncio.client"}


def available(name: str) -> bool:
    try:
        __import__(MODULES[name])
        return True
    except ImportError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mbytes", type=int, default=256, help="MiB per run")
    parser.add_argument("--sizes", default="16384,262144", help="message sizes in bytes")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--libs", default=",".join(LIBRARIES))
    args = parser.parse_args()
    pki = make_pki(pathlib.Path(tempfile.mkdtemp(prefix="bench-ws-")))
    server_ctx = pki.server_context()
    client_ctx = pki.client_context()
    total = args.mbytes * 1024 * 1024
    sizes = [int(s) for s in args.sizes.split(",")]
    libs = [name for name in args.libs.split(",") if name]
    print(f"codec: {frames.IMPLEMENTATION}; TLS {ssl.OPENSSL_VERSION}; uvloop {uvloop.__version__}; "
          f"{args.mbytes} MiB per run, best of {args.repeat}")
    print(f"{'library':<15} {'direction':<26} {'msg size':>9} {'MB/s':>9} {'MB/cpu-s':>9}")
    for size in sizes:
        for upload in (True, False):
            direction = "client->server (masked)" if upload else "server->client"
            for name in libs:
                if not available(name):
                    print(f"{name:<15} {direction:<26} {size:>9} {'skipped (not installed)':>9}")
                    continue
                best = best_cpu = 0.0
                for _ in range(args.repeat):
                    cpu = time.process_time()
                    rate = uvloop.run(LIBRARIES[name](server_ctx, client_ctx, total, size, upload))
                    cpu = time.process_time() - cpu  # both ends, setup included (negligible)
                    best = max(best, rate)
                    best_cpu = max(best_cpu, (total // size * size) / cpu)
                print(f"{name:<15} {direction:<26} {size:>9} {best / 1e6:>9.1f} {best_cpu / 1e6:>9.1f}",
                      flush=True)


if __name__ == "__main__":
    main()
