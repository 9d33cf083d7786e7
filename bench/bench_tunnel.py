"""End-to-end tunnel benchmarks under pytest-benchmark: real relay and agent processes.

Run from the repository root (not part of the test run, which only collects ``tests/``)::

    python -m pytest bench/bench_tunnel.py                        # WSS and QUIC, ~1 minute
    python -m pytest bench/bench_tunnel.py -k wss                 # one carrier
    python -m pytest bench/bench_tunnel.py --benchmark-autosave   # keep the run in .benchmarks/
    python -m pytest bench/bench_tunnel.py --benchmark-compare \\
        --benchmark-compare-fail=median:15%                        # fail on a regression

Per carrier, one ``tunnel-relay serve`` and one ``tunnel-agent`` on loopback, started through
the command-line contract as users start them (bench/peers/ours.py), with two private services
behind the agent (bench/peers/bulk.py and bench/peers/echo.py). The cases:

- ``test_upload``: 64 MiB worker -> service on a new connection; the clock stops when the
  service has counted every byte and said so (one round: connect, transfer, answer).
- ``test_download``: 64 MiB service -> worker on a new connection, to the service's close.
- ``test_round_trip``: one 64-byte round trip on an open connection through the tunnel.

Times are what pytest-benchmark compares; the throughput cases also record Gbit/s of their
best round in ``extra_info`` (shown in ``--benchmark-json`` output).
"""

from __future__ import annotations

import socket
import struct
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.peers.bulk import HEADER  # noqa: E402
from bench.peers.ours import OurRelay, ours_available  # noqa: E402
from bench.peers.procs import LOOPBACK, ProcessRegistry  # noqa: E402
from bench.peers.services import start_bulk, start_echo  # noqa: E402

BULK = 64 << 20
PAYLOAD = bytes(range(64))
SEND_CHUNK = memoryview(bytes(1 << 20))


@pytest.fixture(scope="module", params=["wss", "quic"])
def tunnel(request):
    """``{"bulk": port, "echo": port}``: the endpoints of one agent over ``request.param``."""
    with tempfile.TemporaryDirectory(prefix="bench-tunnel-") as tmp:
        reg = ProcessRegistry(Path(tmp) / "logs")
        try:
            why = ours_available(reg)
            if why:
                pytest.skip(why)
            bulk, _ = start_bulk(reg)
            echo, _ = start_echo(reg)
            relay = OurRelay(reg, Path(tmp) / "relay-state")
            relay.start()
            ports, _ = relay.expose_many({"bench-bulk": bulk, "bench-echo": echo}, request.param)
            yield {"bulk": ports["bench-bulk"], "echo": ports["bench-echo"]}
        finally:
            reg.close()


def _connect(port: int) -> socket.socket:
    s = socket.create_connection((LOOPBACK, port), timeout=60)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise AssertionError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def upload(port: int, n: int = BULK) -> None:
    with _connect(port) as s:
        s.sendall(HEADER.pack(b"U", n))
        left = n
        while left:
            piece = SEND_CHUNK[:min(left, len(SEND_CHUNK))]
            s.sendall(piece)
            left -= len(piece)
        (count,) = struct.unpack(">Q", _recv_exact(s, 8))
    assert count == n, f"the service counted {count} of {n} bytes"


def download(port: int, n: int = BULK) -> None:
    buf = bytearray(1 << 20)
    got = 0
    with _connect(port) as s:
        s.sendall(HEADER.pack(b"D", n))
        while read := s.recv_into(buf):
            got += read
    assert got == n, f"received {got} of {n} bytes"


def _gbit(benchmark) -> None:
    benchmark.extra_info["bytes"] = BULK
    benchmark.extra_info["best_gbit_per_s"] = round(BULK * 8 / benchmark.stats.stats.min / 1e9, 3)


def test_upload(benchmark, tunnel):
    benchmark.pedantic(upload, args=(tunnel["bulk"],), rounds=10, warmup_rounds=1)
    _gbit(benchmark)


def test_download(benchmark, tunnel):
    benchmark.pedantic(download, args=(tunnel["bulk"],), rounds=10, warmup_rounds=1)
    _gbit(benchmark)


def test_round_trip(benchmark, tunnel):
    with _connect(tunnel["echo"]) as s:
        def one() -> None:
            s.sendall(PAYLOAD)
            if _recv_exact(s, 64) != PAYLOAD:
                raise AssertionError("the echo returned other bytes")
        for _ in range(200):   # warm the path: first messages allocate buffers on each hop
            one()
        benchmark.pedantic(one, rounds=2000, iterations=1)
