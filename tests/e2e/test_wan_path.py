"""The packet-level WAN path of bench/wan (two network namespaces, the C forwarder between):
it delays each direction by its own amount, drops about the configured fraction, holds the
rate with a bounded queue, and our tunnel carries exact bytes across it at 1 % loss.

Needs root, /dev/net/tun and gcc (the forwarder is built on first use). Assertions are
bounds a loaded 2-core machine still meets: a delay is never shorter than configured, a loss
count sits within a wide binomial bound, a rate is never exceeded.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.peers.ours import OurRelay  # noqa: E402
from bench.peers.services import start_echo  # noqa: E402
from bench.wan import Direction, PathSpec, WanPath, call_in, unavailable_reason  # noqa: E402

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(unavailable_reason() is not None, reason=f"WAN testbed: {unavailable_reason()}"),
]

PORT = 9000
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)


def udp_socket(host: str, rcvbuf: int = 4 << 20) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)   # arrival time stamped by the kernel
    s.bind((host, PORT))
    s.settimeout(0.5)
    return s


class Receiver:
    """Counts datagrams on ``sock`` until ``quiet`` seconds pass without one, with the
    kernel's arrival time of each (so a late reading thread does not skew rates) and its
    one-way delay (the sender stamps the wall clock: one clock for both namespaces)."""

    def __init__(self, sock: socket.socket, quiet: float = 1.0) -> None:
        self.sock, self.quiet = sock, quiet
        self.count = self.bytes = 0
        self.arrivals: list[tuple[float, int]] = []
        self.delays: list[float] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        idle_since = time.monotonic()
        while time.monotonic() - idle_since < self.quiet or self.count == 0 and time.monotonic() - idle_since < 20:
            try:
                data, anc, _, _ = self.sock.recvmsg(65536, 64)
            except socket.timeout:
                continue
            idle_since = time.monotonic()
            sec, nsec = next(struct.unpack("qq", d[:16]) for lvl, kind, d in anc
                             if lvl == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS)
            at = sec + nsec / 1e9
            self.count += 1
            self.bytes += len(data) + 28  # IP and UDP headers: what the path's rate counts
            self.arrivals.append((at, len(data) + 28))
            self.delays.append(at - float(data[:20].decode()))

    def join(self) -> "Receiver":
        self.thread.join(40)
        assert not self.thread.is_alive()
        return self


def stamped(size: int = 100) -> bytes:
    return f"{time.time():<20.6f}".encode().ljust(size, b"x")


def test_each_direction_has_its_own_delay():
    spec = PathSpec(a2b=Direction(delay_ms=30), b2a=Direction(delay_ms=10))
    with WanPath(spec) as path:
        in_b = call_in(path.ns_b, udp_socket, path.addr_b)
        in_a = call_in(path.ns_a, udp_socket, path.addr_a)
        out_a = call_in(path.ns_a, socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
        out_b = call_in(path.ns_b, socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
        at_b, at_a = Receiver(in_b, quiet=0.5), Receiver(in_a, quiet=0.5)
        for _ in range(20):
            out_a.sendto(stamped(), (path.addr_b, PORT))
            out_b.sendto(stamped(), (path.addr_a, PORT))
        at_b.join(), at_a.join()
        for s in (in_a, in_b, out_a, out_b):
            s.close()
    assert at_b.count == at_a.count == 20
    # Never early; late only by what a busy machine adds (a wide margin for the median).
    assert min(at_b.delays) >= 0.030 and sorted(at_b.delays)[10] < 0.030 + 0.030, at_b.delays
    assert min(at_a.delays) >= 0.010 and sorted(at_a.delays)[10] < 0.010 + 0.030, at_a.delays


def test_drops_about_the_configured_fraction_and_only_where_configured():
    n, loss = 4000, 0.05
    spec = PathSpec(a2b=Direction(loss=loss), b2a=Direction(), seed=7)
    with WanPath(spec) as path:
        in_b = call_in(path.ns_b, udp_socket, path.addr_b)
        in_a = call_in(path.ns_a, udp_socket, path.addr_a)
        out_a = call_in(path.ns_a, socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
        out_b = call_in(path.ns_b, socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
        at_b, at_a = Receiver(in_b), Receiver(in_a)
        for i in range(n):
            out_a.sendto(stamped(), (path.addr_b, PORT))
            out_b.sendto(stamped(), (path.addr_a, PORT))
            if i % 200 == 199:   # let the receivers keep up: socket buffers are not the path
                time.sleep(0.002)
        at_b.join(), at_a.join()
        stats = path.stats()
        drops = path.device_drops()
        for s in (in_a, in_b, out_a, out_b):
            s.close()
    a2b, b2a = stats["a2b"], stats["b2a"]
    assert a2b["rx_packets"] == n and b2a["rx_packets"] == n
    sd = (n * loss * (1 - loss)) ** 0.5
    assert abs(a2b["lost"] - n * loss) < 6 * sd, a2b           # 200 +- 83
    assert at_b.count == n - a2b["lost"] == a2b["tx_packets"]   # what was not dropped arrived
    assert b2a["lost"] == 0 and at_a.count == n                 # the other way lost nothing
    assert drops == 0


def test_holds_the_rate_with_a_bounded_queue():
    rate_mbit, queue = 10.0, 60_000
    spec = PathSpec(a2b=Direction(delay_ms=1, rate_mbit=rate_mbit, queue_bytes=queue),
                    b2a=Direction(delay_ms=1))
    with WanPath(spec) as path:
        in_b = call_in(path.ns_b, udp_socket, path.addr_b)
        out_a = call_in(path.ns_a, socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
        out_a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        at_b = Receiver(in_b)
        for _ in range(1500):                        # ~2 MB offered far faster than 20 Mbit/s
            out_a.sendto(stamped(1400), (path.addr_b, PORT))
        at_b.join()
        stats = path.stats()["a2b"]
        in_b.close(), out_a.close()
    assert stats["queue_drops"] > 0                      # the queue overflowed...
    assert stats["max_backlog_bytes"] <= queue           # ...but never held more than its size
    assert at_b.count == stats["tx_packets"] == 1500 - stats["queue_drops"]
    # From the 5th arrival to the last (a late first release would flatter the rate).
    arrivals = at_b.arrivals[4:]
    seconds = arrivals[-1][0] - arrivals[0][0]
    mbit = sum(size for _, size in arrivals[1:]) * 8 / seconds / 1e6
    assert mbit <= rate_mbit * 1.1, mbit                 # never faster than the bottleneck
    assert mbit >= rate_mbit * 0.5, mbit                 # and not starved (a loaded machine is late)


@pytest.mark.parametrize("transport", ["wss", "quic"])
def test_tunnel_carries_exact_bytes_across_a_lossy_path(reg, tmp_path, transport):
    """Relay in namespace A, agent and service in B, 20 ms round trip, 100 Mbit/s, 1 % loss
    each way: 1 MiB out and back through the tunnel arrives exactly, and the path did drop
    packets on the way."""
    spec = PathSpec.symmetric(rtt_ms=20, rate_mbit=100, loss=0.01, seed=3)
    with WanPath(spec, log_path=tmp_path / "forwarder.log") as path:
        echo_port, _ = start_echo(reg, host="127.0.0.1", netns=path.ns_b)
        relay = OurRelay(reg, tmp_path / "relay-state", host=path.addr_a, netns=path.ns_a)
        relay.start()
        ports, agent = relay.expose_many({"db": echo_port}, transport, agent_netns=path.ns_b)
        payload = os.urandom(1 << 20)

        def round_trip() -> bytes:
            got = bytearray()
            with socket.create_connection(("127.0.0.1", ports["db"]), timeout=30) as s:
                sender = threading.Thread(target=lambda: (s.sendall(payload), s.shutdown(socket.SHUT_WR)),
                                          daemon=True)
                sender.start()
                while chunk := s.recv(1 << 16):
                    got += chunk
                sender.join(30)
            return bytes(got)
        before = path.stats()
        echoed = call_in(path.ns_a, round_trip)
        after = path.stats()
        assert agent.poll() is None
    assert len(echoed) == len(payload)
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
    lost = sum(after[d]["lost"] - before[d]["lost"] for d in ("a2b", "b2a"))
    assert lost > 0, "the path dropped nothing: the test did not test loss"
