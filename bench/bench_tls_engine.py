"""The WSS carrier's TLS engines side by side: process CPU per GB on each end, and throughput.

Two processes on loopback, as agent and relay are: a relay-side server (``serve_wss_pipes``) and
an agent-side client (``open_wss_pipe``), one TLS WebSocket pipe between them, uvloop on both.
One end sends ``--mbytes`` as fast as the pipe's backpressure allows, the other counts; each
process reads its own CPU time over the transfer. Both ends run the same engine
(``tunnel.carriers.tls``: ``openssl``, the default, or ``ssl``, the loop's TLS transport), and
runs alternate between the engines (A, B, A, B, ...) so that load from other processes on the
machine falls on both alike. Prints one line per run and the median per engine and direction.

    python bench/bench_tls_engine.py [--mbytes 1024] [--repeat 3] [--engines openssl,ssl]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import uvloop  # noqa: E402

from tests.helpers import make_pki  # noqa: E402
from tunnel.carriers import tls  # noqa: E402
from tunnel.carriers.pipe import PipeReceiver  # noqa: E402
from tunnel.carriers.wss import open_wss_pipe, serve_wss_pipes  # noqa: E402
from tunnel.core.limits import Limits  # noqa: E402

LIMITS = Limits()
#: Bytes per Pipe.write: one WebSocket message, as the session's writes of 64 KiB frames batch up.
MESSAGE = 256 * 1024


class _End(PipeReceiver):
    """Counts what arrives; sends when asked, honouring pause/resume."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.got = 0
        self.done = asyncio.get_running_loop().create_future()
        self.resumed = asyncio.Event()
        self.resumed.set()

    def pipe_data_received(self, data) -> None:
        self.got += len(data)
        if self.got >= self.total and not self.done.done():
            self.done.set_result(None)

    def pipe_pause_writing(self) -> None:
        self.resumed.clear()

    def pipe_resume_writing(self) -> None:
        self.resumed.set()

    def pipe_connection_lost(self, exc) -> None:
        if not self.done.done():
            self.done.set_exception(exc or ConnectionError("pipe closed"))

    async def send(self, pipe, total: int) -> None:
        payload = os.urandom(MESSAGE)
        sent = 0
        while sent < total:
            if not self.resumed.is_set():
                await self.resumed.wait()
            pipe.write([payload])
            sent += MESSAGE


async def _transfer(pipe, end: _End, total: int, sending: bool) -> tuple[float, float]:
    """Send or receive ``total`` bytes; the CPU seconds of this process and the wall time. The
    receiver answers one byte at the end, so the sender's figure covers the whole transfer too."""
    cpu, wall = time.process_time(), time.perf_counter()
    if sending:
        end.total = 1
        await end.send(pipe, total)
        await end.done
    else:
        await end.done
        pipe.write([b"!"])
    return time.process_time() - cpu, time.perf_counter() - wall


def _server(engine: str, pki, total: int, server_sends: bool, conn) -> None:
    async def main() -> None:
        tls.select(engine)
        accepted = asyncio.get_running_loop().create_future()

        def on_pipe(pipe, slot) -> None:
            end = _End(total)
            pipe.set_receiver(end)
            slot.release()
            accepted.set_result((pipe, end))

        server = await serve_wss_pipes("127.0.0.1", 0, ssl_context=pki.server_context(), limits=LIMITS,
                                       on_pipe=on_pipe)
        conn.send(server.sockets[0].getsockname()[1])
        pipe, end = await accepted
        result = await _transfer(pipe, end, total, server_sends)
        conn.send(result)
        await asyncio.sleep(0)
        pipe.abort()
        server.close()

    uvloop.run(main())


def run_once(engine: str, pki, total: int, upload: bool) -> dict:
    """One transfer; ``upload``: agent (client) -> relay (server), else relay -> agent."""
    parent, child = multiprocessing.Pipe()
    proc = multiprocessing.get_context("fork").Process(target=_server,
                                                       args=(engine, pki, total, not upload, child))
    proc.start()
    port = parent.recv()

    async def client():
        tls.select(engine)
        pipe = await open_wss_pipe(f"wss://localhost:{port}", ssl_context=pki.client_context(), limits=LIMITS,
                                   timeout=30)
        end = _End(total)
        pipe.set_receiver(end)
        result = await _transfer(pipe, end, total, upload)
        pipe.abort()
        return result

    agent_cpu, agent_wall = uvloop.run(client())
    relay_cpu, relay_wall = parent.recv()
    proc.join(30)
    receiver_wall = relay_wall if upload else agent_wall
    gb = total / 1e9
    return {"engine": engine, "direction": "agent->relay" if upload else "relay->agent",
            "gbit_s": total * 8 / receiver_wall / 1e9,
            "agent_cpu_s_per_gb": agent_cpu / gb, "relay_cpu_s_per_gb": relay_cpu / gb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mbytes", type=int, default=1024, help="MiB per run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per engine and direction")
    parser.add_argument("--engines", default="openssl,ssl")
    args = parser.parse_args()
    pki = make_pki(pathlib.Path(tempfile.mkdtemp(prefix="bench-tls-")))
    total = args.mbytes * 1024 * 1024 // MESSAGE * MESSAGE
    engines = [e for e in args.engines.split(",") if e]
    print(f"{args.mbytes} MiB per run, {MESSAGE // 1024} KiB messages, engines alternating; "
          f"load average {os.getloadavg()[0]:.2f} at the start")
    print(f"{'engine':<8} {'direction':<13} {'Gbit/s':>7} {'agent s/GB':>11} {'relay s/GB':>11}")
    rows = []
    for upload in (True, False):
        for _ in range(args.repeat):
            for engine in engines:
                r = run_once(engine, pki, total, upload)
                rows.append(r)
                print(f"{r['engine']:<8} {r['direction']:<13} {r['gbit_s']:>7.2f} {r['agent_cpu_s_per_gb']:>11.3f} "
                      f"{r['relay_cpu_s_per_gb']:>11.3f}", flush=True)
    print("median")
    for direction in ("agent->relay", "relay->agent"):
        for engine in engines:
            sel = [r for r in rows if r["engine"] == engine and r["direction"] == direction]
            med = {k: statistics.median(r[k] for r in sel) for k in ("gbit_s", "agent_cpu_s_per_gb",
                                                                     "relay_cpu_s_per_gb")}
            print(f"{engine:<8} {direction:<13} {med['gbit_s']:>7.2f} {med['agent_cpu_s_per_gb']:>11.3f} "
                  f"{med['relay_cpu_s_per_gb']:>11.3f}")


if __name__ == "__main__":
    main()
