"""Our QUIC carrier: two QuicLinks over loopback moving one stream of SIZE bytes.

Same shape as bench_quic_bare.py (server in a child process, self-signed certificate made
here), but through ``tunnel.carriers.quic``: flow control follows consumption, sends are bounded.
Prints MB/s and a cProfile top-20 of the sending side (``--profile-receiver`` for the other).

    python bench/bench_quic.py [--size-mb 200] [--asyncio] [--no-profile] [--repeat 3]

The datagram size is the carrier's own choice (the route MTU, capped at 16 KiB, on loopback
16384) unless TUNNEL_QUIC_MAX_DATAGRAM_SIZE (Limits.quic_max_datagram_size) forces one (1452: a standard internet path).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import multiprocessing
import os
import pstats
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_quic_bare import make_cert, new_loop  # noqa: E402

from tunnel.carriers.base import LinkHandler, StreamHandler  # noqa: E402
from tunnel.carriers.quic import connect_quic, serve_quic  # noqa: E402
from tunnel.core.limits import Limits  # noqa: E402

CHUNK = 256 * 1024


class Sink(StreamHandler):
    def __init__(self, stream):
        self.stream = stream
        self.total = 0

    def data_received(self, data):
        n = len(data)
        self.total += n
        self.stream.consume(n)

    def eof_received(self):
        self.stream.write(str(self.total).encode())
        self.stream.write_eof()


class Accept(LinkHandler):
    def stream_opened(self, stream):
        return Sink(stream)


def server_main(cert, key, port_queue, use_uvloop, profile):
    async def main():
        def on_link(link):
            link.set_handler(Accept())
            link.handshake_done()

        server = await serve_quic("127.0.0.1", 0, cert_file=cert, key_file=key, limits=Limits.from_env(), on_link=on_link)
        port_queue.put(server.port)
        await asyncio.Event().wait()

    loop = new_loop(use_uvloop)
    if profile:
        prof = cProfile.Profile()
        prof.enable()
        import signal

        def dump(*_):
            prof.disable()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(20)
            print("--- receiver profile ---\n" + out.getvalue(), flush=True)
            os._exit(0)

        signal.signal(signal.SIGTERM, dump)
    loop.run_until_complete(main())


class Source(StreamHandler):
    def __init__(self):
        self.answer = bytearray()
        self.done = asyncio.Event()
        self.resume = asyncio.Event()

    def data_received(self, data):
        self.answer += data
        self.stream.consume(len(data))

    def eof_received(self):
        self.done.set()

    def writable(self):
        self.resume.set()


async def client(port, ca, size):
    link = await connect_quic("127.0.0.1", port, ca_file=ca, server_name="localhost", limits=Limits.from_env(), timeout=10)
    link.set_handler(LinkHandler())
    h = Source()
    stream = link.open_stream(b"bench", h)
    h.stream = stream
    block = os.urandom(CHUNK)
    start = time.perf_counter()
    sent = 0
    while sent < size:
        stream.write(block)
        sent += len(block)
        if stream.paused:
            h.resume.clear()
            await h.resume.wait()
    stream.write_eof()
    await h.done.wait()
    elapsed = time.perf_counter() - start
    assert int(h.answer) == sent, (h.answer, sent)
    link.close()
    return elapsed


def run_once(args, use_uvloop: bool, size: int, profile: bool):
    """One transfer; returns (seconds, sender CPU-s, receiver CPU-s, sender profile or None)."""
    with tempfile.TemporaryDirectory() as d:
        cert, key = make_cert(d)
        queue = multiprocessing.Queue()
        proc = multiprocessing.Process(target=server_main, args=(cert, key, queue, use_uvloop, args.profile_receiver),
                                       daemon=True)
        child0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc.start()
        try:
            port = queue.get(timeout=30)
            cpu0 = time.process_time()
            loop = new_loop(use_uvloop)
            prof = cProfile.Profile() if profile else None
            if prof:
                prof.enable()
            elapsed = loop.run_until_complete(client(port, cert, size))
            if prof:
                prof.disable()
            loop.close()
        finally:
            cpu_client = time.process_time() - cpu0
            proc.terminate()
            proc.join()
    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_server = (child.ru_utime + child.ru_stime) - (child0.ru_utime + child0.ru_stime)
    return elapsed, cpu_client, cpu_server, prof


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--asyncio", action="store_true", help="plain asyncio loop instead of uvloop")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--profile-receiver", action="store_true")
    parser.add_argument("--repeat", type=int, default=1, help="runs; the best of each figure is reported too")
    args = parser.parse_args()
    use_uvloop = not args.asyncio
    size = args.size_mb * 1024 * 1024
    dgram = Limits.from_env().quic_max_datagram_size or "path-derived"
    label = f"tunnel.carriers.quic {'uvloop' if use_uvloop else 'asyncio'} datagram={dgram}"
    runs = []
    prof = None
    for i in range(args.repeat):
        load = os.getloadavg()[0]
        elapsed, cpu_client, cpu_server, p = run_once(args, use_uvloop, size, profile=not args.no_profile and i == 0)
        prof = prof or p
        mbps = size / elapsed / 1e6
        runs.append((mbps, size / 1e6 / cpu_client, size / 1e6 / cpu_server))
        print(f"{label}: {size / 1e6:.0f} MB in {elapsed:.2f} s = {mbps:.1f} MB/s ({mbps * 8 / 1000:.2f} Gbit/s)"
              f"{' (under cProfile)' if p else ''}; load {load:.2f}")
        print(f"  CPU: sender {cpu_client:.2f} s ({runs[-1][1]:.1f} MB per CPU-s), "
              f"receiver {cpu_server:.2f} s ({runs[-1][2]:.1f} MB per CPU-s, includes its setup)", flush=True)
    if args.repeat > 1:
        best = [max(r[k] for r in runs) for k in range(3)]
        print(f"BEST {label}: {best[0]:.1f} MB/s wall ({best[0] * 8 / 1000:.2f} Gbit/s), "
              f"sender {best[1]:.1f} MB/CPU-s, receiver {best[2]:.1f} MB/CPU-s")
    if prof:
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(20)
        print("--- sender profile ---\n" + out.getvalue())


if __name__ == "__main__":
    sys.exit(main())
