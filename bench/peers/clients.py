"""Load clients: 64-byte round trips, connection rate, 1,000 concurrent streams, iperf3, wrk.

All of them connect to the ``host:port`` a system gives (loopback unless told otherwise) and
are bounded in count and in time.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Callable

from .procs import LOOPBACK, HarnessError, ProcessRegistry

IPERF3 = shutil.which("iperf3") or "/usr/bin/iperf3"
WRK = shutil.which("wrk") or "/usr/bin/wrk"
REDIS_BENCHMARK = shutil.which("redis-benchmark") or "/usr/bin/redis-benchmark"
PAYLOAD = bytes(range(64))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise HarnessError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def _connect(port: int, timeout: float = 5.0, host: str = LOOPBACK) -> socket.socket:
    s = socket.create_connection((host, port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, int(round(q / 100.0 * (len(sorted_values) - 1)))))
    return sorted_values[k]


@dataclass
class RttResult:
    p50_us: float
    p99_us: float
    mean_us: float
    count: int


def round_trips(port: int, count: int, warmup: int = 200, max_seconds: float = 30.0,
                host: str = LOOPBACK) -> RttResult:
    """``count`` sequential 64-byte round trips on one connection (after ``warmup`` ones),
    fewer when ``max_seconds`` runs out first."""
    s = _connect(port, timeout=max(5.0, max_seconds), host=host)
    samples: list[float] = []
    deadline = time.monotonic() + max_seconds
    try:
        pc = time.perf_counter_ns
        for i in range(warmup + count):
            t0 = pc()
            s.sendall(PAYLOAD)
            if _recv_exact(s, 64) != PAYLOAD:
                raise HarnessError("echo returned different bytes")
            t1 = pc()
            if i >= warmup:
                samples.append((t1 - t0) / 1000.0)
            if time.monotonic() > deadline:
                break
    finally:
        s.close()
    if not samples:
        raise HarnessError("no round trip measured")
    samples.sort()
    return RttResult(percentile(samples, 50), percentile(samples, 99),
                     statistics.fmean(samples), len(samples))


@dataclass
class RateResult:
    per_second: float
    completed: int
    errors: int


def connection_rate(port: int, seconds: float, parallel: int = 1,
                    max_count: int = 2_000_000) -> RateResult:
    """Connect, one 64-byte round trip, close; in ``parallel`` loops for ``seconds``."""
    done = [0] * parallel
    errs = [0] * parallel
    start = time.monotonic()
    deadline = start + seconds

    def loop(i: int) -> None:
        n = 0
        while n < max_count and time.monotonic() < deadline:
            try:
                s = _connect(port)
                try:
                    s.sendall(PAYLOAD)
                    if _recv_exact(s, 64) != PAYLOAD:
                        raise HarnessError("echo returned different bytes")
                finally:
                    s.close()
                n += 1
            except (OSError, HarnessError):
                errs[i] += 1
                if errs[i] > 1000:
                    break
                time.sleep(0.001)
        done[i] = n

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(parallel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    elapsed = time.monotonic() - start
    total = sum(done)
    return RateResult(total / elapsed if elapsed > 0 else 0.0, total, sum(errs))


@dataclass
class StreamsResult:
    ok: int
    wanted: int
    open_seconds: float
    peak_rss: int
    rss_all_open: int
    rtt_all_p50_ms: float
    rtt_all_max_ms: float


class RssSampler:
    """Samples ``sample()`` every ``interval`` seconds on a thread; keeps the peak."""

    def __init__(self, sample: Callable[[], int], interval: float = 0.05) -> None:
        self.sample = sample
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.sample())
            except Exception:  # noqa: BLE001 - a vanished process reads as 0
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join(5)
        try:
            self.peak = max(self.peak, self.sample())
        except Exception:  # noqa: BLE001
            pass


def concurrent_streams(port: int, n: int = 1000, rss: Callable[[], int] | None = None,
                       timeout: float = 60.0, connect_concurrency: int = 64) -> StreamsResult:
    """Open ``n`` connections (each does a 64-byte round trip and stays open), then do one
    more round trip on all of them at once, sampling ``rss()`` throughout."""
    rss = rss or (lambda: 0)

    async def run() -> tuple[int, float, int, list[float]]:
        sem = asyncio.Semaphore(connect_concurrency)
        conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

        async def open_one() -> None:
            async with sem:
                r, w = await asyncio.open_connection(LOOPBACK, port)
                w.write(PAYLOAD)
                if await r.readexactly(64) != PAYLOAD:
                    raise HarnessError("echo returned different bytes")
                conns.append((r, w))

        async def rt(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> float:
            t0 = time.perf_counter()
            w.write(PAYLOAD)
            if await r.readexactly(64) != PAYLOAD:
                raise HarnessError("echo returned different bytes")
            return (time.perf_counter() - t0) * 1000.0

        t0 = time.monotonic()
        try:
            res = await asyncio.gather(*(open_one() for _ in range(n)), return_exceptions=True)
            opened = time.monotonic() - t0
            failed_open = sum(1 for x in res if isinstance(x, BaseException))
            rss_open = rss()
            rtts = await asyncio.gather(*(rt(r, w) for r, w in conns), return_exceptions=True)
            good = [x for x in rtts if isinstance(x, float)]
            del failed_open
            return len(good), opened, rss_open, good
        finally:
            for _, w in conns:
                w.close()
            for _, w in conns:
                try:
                    await asyncio.wait_for(w.wait_closed(), 2)
                except (asyncio.TimeoutError, OSError, ConnectionError):
                    pass

    async def bounded():
        return await asyncio.wait_for(run(), timeout)

    with RssSampler(rss) as sampler:
        try:
            ok, opened, rss_open, good = asyncio.run(bounded())
        except asyncio.TimeoutError:
            raise HarnessError(f"1,000 streams did not finish within {timeout:.0f}s") from None
    good.sort()
    return StreamsResult(ok, n, opened, sampler.peak, rss_open,
                         percentile(good, 50), good[-1] if good else float("nan"))


@dataclass
class IperfResult:
    bits_per_second: float   # receiver side
    bytes: int               # received bytes
    seconds: float
    retransmits: int | None


def iperf3(reg: ProcessRegistry, port: int, seconds: float, parallel: int = 1,
           reverse: bool = False, name: str = "iperf3-client", host: str = LOOPBACK,
           netns: str | None = None) -> IperfResult:
    """``iperf3 -c host -p port -t seconds -J`` (inside ``netns`` when given)."""
    argv = iperf3_argv(port, seconds, parallel, reverse, host)
    # Through a tunnel the server may still be closing the previous test when the next
    # client arrives ("the server is busy running a test"): retry for a few seconds.
    deadline = time.monotonic() + 15
    while True:
        cp = reg.run(argv, name, timeout=seconds + 40, netns=netns)
        try:
            return parse_iperf3(cp.stdout, cp.stderr, cp.returncode)
        except IperfBusy:
            if time.monotonic() > deadline:
                raise HarnessError("iperf3: the server stayed busy") from None
            time.sleep(0.5)


def iperf3_argv(port: int, seconds: float, parallel: int = 1, reverse: bool = False,
                host: str = LOOPBACK) -> list[str]:
    argv = [IPERF3, "-c", host, "-p", str(port), "-t", str(seconds), "-J",
            "--connect-timeout", "5000"]
    if parallel > 1:
        argv += ["-P", str(parallel)]
    if reverse:
        argv += ["-R"]
    return argv


class IperfBusy(HarnessError):
    """The iperf3 server was still busy with the previous test."""


def parse_iperf3(stdout: str, stderr: str = "", returncode: int = 0) -> IperfResult:
    """The receiver-side result of ``iperf3 -J`` output."""
    try:
        data = json.loads(stdout)
    except json.JSONDecodeError:
        raise HarnessError(f"iperf3 gave no JSON (rc={returncode}): "
                           f"{(stdout + stderr)[-400:]}") from None
    err = data.get("error")
    if err and "busy" in err:
        raise IperfBusy(err)
    if err:
        raise HarnessError(f"iperf3: {err}")
    end = data.get("end", {})
    recv = end.get("sum_received") or {}
    sent = end.get("sum_sent") or {}
    if not recv:
        raise HarnessError("iperf3 JSON lacks end.sum_received")
    return IperfResult(float(recv["bits_per_second"]), int(recv["bytes"]),
                       float(recv.get("seconds", 0.0)), sent.get("retransmits"))


@dataclass
class WrkResult:
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise HarnessError(f"wrk: cannot parse latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def wrk(reg: ProcessRegistry, port: int, seconds: float, threads: int = 2,
        connections: int = 32) -> WrkResult:
    argv = [WRK, f"-t{threads}", f"-c{connections}", f"-d{max(1, int(round(seconds)))}s",
            "--latency", "--timeout", "5s", f"http://{LOOPBACK}:{port}/"]
    cp = reg.run(argv, "wrk", timeout=seconds + 30)
    out = cp.stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if cp.returncode != 0 or not m:
        raise HarnessError(f"wrk failed (rc={cp.returncode}): {(out + cp.stderr)[-400:]}")
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.M))
    reqs = re.search(r"(\d+) requests in", out)
    errors = 0
    em = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if em:
        errors += sum(int(x) for x in em.groups())
    nm = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if nm:
        errors += int(nm.group(1))
    return WrkResult(float(m.group(1)), _ms(lat.get("50", "nan")) if "50" in lat else float("nan"),
                     _ms(lat["99"]) if "99" in lat else float("nan"),
                     int(reqs.group(1)) if reqs else 0, errors)


def redis_benchmark(reg: ProcessRegistry, port: int, requests: int, pipeline: int = 16,
                    connections: int = 50) -> dict[str, float]:
    """``redis-benchmark -t set,get -P pipeline``: requests per second of each test
    (``{"SET": ..., "GET": ...}``)."""
    argv = [REDIS_BENCHMARK, "-h", LOOPBACK, "-p", str(port), "-t", "set,get", "-n", str(requests),
            "-P", str(pipeline), "-c", str(connections), "--csv"]
    cp = reg.run(argv, "redis-benchmark", timeout=300)
    rates = {name: float(rps) for name, rps in re.findall(r'^"(SET|GET)","([\d.]+)"', cp.stdout, re.M)}
    if cp.returncode != 0 or set(rates) != {"SET", "GET"}:
        raise HarnessError(f"redis-benchmark failed (rc={cp.returncode}): {(cp.stdout + cp.stderr)[-400:]}")
    return rates
