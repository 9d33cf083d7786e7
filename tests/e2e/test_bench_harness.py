"""Smoke tests of the end-to-end benchmark harness pieces that do not need our tunnel:
``ssh -R`` through a private sshd forwards, so does a stunnel pair, a CPU quota holds a process to its share, and
the load clients measure against a local echo server. (bench/e2e.py itself is not run here:
benchmarks stay out of the test run; the WAN path has its own tests in test_wan_path.py.)"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.peers import clients, cpucap  # noqa: E402
from bench.peers.procs import cpu_seconds, rss_bytes, wait_until  # noqa: E402
from bench.peers.services import start_echo  # noqa: E402


@pytest.fixture
def echo_port(reg):
    port, _ = start_echo(reg)
    return port


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(1 << 20, n - len(buf)))
        assert chunk, f"closed after {len(buf)} of {n} bytes"
        buf += chunk
    return bytes(buf)


@pytest.mark.skipif(not (shutil.which("sshd") or os.path.exists("/usr/sbin/sshd"))
                    or not shutil.which("ssh"), reason="openssh server/client not installed")
@pytest.mark.skipif(os.geteuid() != 0, reason="the private sshd logs in as root")
def test_ssh_reverse_forward_carries_bytes(reg, echo_port, tmp_path):
    from bench.peers.sshd import PrivateSshd

    sshd = PrivateSshd(reg, tmp_path / "sshd")
    sshd.start()
    for cipher in (None, "aes128-gcm@openssh.com"):
        fwd, proc = sshd.forward(echo_port, cipher)
        with socket.create_connection(("127.0.0.1", fwd), timeout=10) as s:
            s.sendall(b"\x2a")
            assert recv_exact(s, 1) == b"\x2a"
            data = os.urandom(100_000)
            s.sendall(data)
            assert recv_exact(s, len(data)) == data
        assert rss_bytes(proc.pid) > 0
        reg.stop(proc)
    # Several forwards ride one ssh connection (as the WAN benchmark uses them).
    ports, proc = sshd.forward_many([echo_port, echo_port])
    for port in ports:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"both")
            assert recv_exact(s, 4) == b"both"
    reg.stop(proc)


@pytest.mark.skipif(not shutil.which("stunnel4") and not shutil.which("stunnel"), reason="stunnel4 not installed")
def test_stunnel_pair_carries_bytes(reg, echo_port, tmp_path):
    from bench.peers.stunnel import Stunnel

    tunnel = Stunnel(reg, tmp_path / "stunnel")
    tunnel.start()
    endpoint, service_side, worker_side = tunnel.forward(echo_port)
    for _ in range(2):  # one TLS connection per worker connection
        with socket.create_connection(("127.0.0.1", endpoint), timeout=10) as s:
            data = os.urandom(100_000)
            s.sendall(data)
            assert recv_exact(s, len(data)) == data
    assert rss_bytes(service_side.pid) > 0 and worker_side.poll() is None


@pytest.mark.skipif(cpucap.unavailable_reason() is not None,
                    reason=f"CPU quota: {cpucap.unavailable_reason()}")
def test_cpu_cap_holds_a_busy_process_to_its_share(reg):
    cores, want = 0.2, 0.2
    busy = reg.spawn([sys.executable, "-c", "while True: pass"], "busy")
    with cpucap.CpuCap(cores) as cap:
        cap.add(busy.pid)
        group = cap.dir
        c0, t0 = cpu_seconds(busy.pid), time.monotonic()
        wait_until(lambda: cpu_seconds(busy.pid) - c0 >= want, 30, "CPU time to accumulate",
                   interval=0.01)
        used, elapsed = cpu_seconds(busy.pid) - c0, time.monotonic() - t0
    # The quota allows at most `cores` of each period (plus one period's quota at the start;
    # CPU time is counted in clock ticks): never faster, however idle the machine.
    assert elapsed >= (used - 0.03) / cores, (used, elapsed)
    assert cap.throttled_seconds > 0
    assert not group.exists()                     # removed, the process moved back out
    assert f":cpu:/{group.name}" not in Path(f"/proc/{busy.pid}/cgroup").read_text()
    reg.stop(busy)


def test_clients_measure_an_echo_server(echo_port):
    r = clients.round_trips(echo_port, 200, warmup=20)
    assert r.count == 200 and 0 < r.p50_us <= r.p99_us
    rate = clients.connection_rate(echo_port, 0.3, parallel=2)
    assert rate.completed > 0 and rate.errors == 0
    s = clients.concurrent_streams(echo_port, 100)
    assert s.ok == 100


def test_wrk_latency_units():
    assert clients._ms("250.00us") == pytest.approx(0.25)
    assert clients._ms("1.50ms") == pytest.approx(1.5)
    assert clients._ms("2.00s") == pytest.approx(2000)


@pytest.mark.skipif(not (shutil.which("redis-server") and shutil.which("redis-benchmark")),
                    reason="redis-server / redis-benchmark not installed")
def test_redis_benchmark_against_a_private_redis(reg, tmp_path):
    from bench.peers.services import start_redis

    port, _ = start_redis(reg, tmp_path / "redis")
    rates = clients.redis_benchmark(reg, port, 2000, pipeline=16, connections=4)
    assert set(rates) == {"SET", "GET"} and all(r > 0 for r in rates.values())
