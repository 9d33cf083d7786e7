"""Smoke tests of the end-to-end benchmark harness pieces that do not need our tunnel:
the delay proxies delay and forward exactly, ``ssh -R`` through a private sshd forwards,
and the load clients measure against a local echo server. (bench/e2e.py itself is not run
here: benchmarks stay out of the test run.)"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.peers import clients  # noqa: E402
from bench.peers.procs import (ProcessRegistry, free_port, python, python_env,  # noqa: E402
                               rss_bytes, wait_listening)
from bench.peers.services import start_echo  # noqa: E402

DELAY_MS = 25.0


@pytest.fixture
def reg(tmp_path):
    r = ProcessRegistry(tmp_path / "logs")
    try:
        yield r
    finally:
        r.close()


@pytest.fixture
def echo_port(reg):
    port, _ = start_echo(reg)
    return port


def start_delay_proxy(reg: ProcessRegistry, target_port: int, udp: bool = False) -> int:
    port = free_port(both=udp)
    argv = [python(), "-m", "bench.peers.delay", "--port", str(port),
            "--target", f"127.0.0.1:{target_port}", "--delay-ms", str(DELAY_MS)]
    if udp:
        argv.append("--udp")
    proc = reg.spawn(argv, "delay", env=python_env(), cwd=REPO)
    wait_listening(port, 15, proc, "delay proxy")
    return port


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(1 << 20, n - len(buf)))
        assert chunk, f"closed after {len(buf)} of {n} bytes"
        buf += chunk
    return bytes(buf)


def test_tcp_delay_proxy_adds_delay_each_way(reg, echo_port):
    port = start_delay_proxy(reg, echo_port)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"warm")
        assert recv_exact(s, 4) == b"warm"
        rtts = []
        for i in range(5):
            msg = bytes([i]) * 64
            t0 = time.perf_counter()
            s.sendall(msg)
            assert recv_exact(s, 64) == msg
            rtts.append(time.perf_counter() - t0)
    # 25 ms each way: a round trip takes at least 50 ms, and not much more on loopback.
    assert min(rtts) >= 2 * DELAY_MS / 1000 * 0.98, rtts
    assert sorted(rtts)[2] < 2 * DELAY_MS / 1000 + 0.05, rtts


def test_tcp_delay_proxy_forwards_exactly_with_half_close(reg, echo_port):
    port = start_delay_proxy(reg, echo_port)
    payload = os.urandom(3 << 20) + bytes(range(256)) * 100
    got = bytearray()

    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        def reader() -> None:
            while True:
                chunk = s.recv(1 << 20)
                if not chunk:
                    return
                got.extend(chunk)
        t = threading.Thread(target=reader, daemon=True)
        t.start()
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)  # FIN goes through; the echo's reply keeps flowing back
        t.join(20)
        assert not t.is_alive(), "no EOF from the proxy after the echo finished"
    assert len(got) == len(payload)
    assert bytes(got) == payload


def test_udp_delay_proxy_delays_and_keeps_order(reg):
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def echo() -> None:
        while not stop.is_set():
            try:
                data, addr = server.recvfrom(65536)
            except socket.timeout:
                continue
            server.sendto(data, addr)
    t = threading.Thread(target=echo, daemon=True)
    t.start()
    try:
        port = start_delay_proxy(reg, server.getsockname()[1], udp=True)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
            c.settimeout(5)
            t0 = time.perf_counter()
            c.sendto(b"ping", ("127.0.0.1", port))
            assert c.recvfrom(100)[0] == b"ping"
            assert time.perf_counter() - t0 >= 2 * DELAY_MS / 1000 * 0.98
            msgs = [i.to_bytes(4, "big") * 100 for i in range(50)]
            for m in msgs:
                c.sendto(m, ("127.0.0.1", port))
            back = [c.recvfrom(65536)[0] for _ in msgs]
            assert back == msgs
    finally:
        stop.set()
        t.join(2)
        server.close()


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
