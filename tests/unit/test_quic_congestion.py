"""The model-based QUIC congestion controller on a simulated path, in simulated time.

A small discrete-event model of one bottleneck: the sender sends full datagrams whenever the
window and the controller's pacing rate allow; each packet may be dropped at random, then
waits in a drop-tail queue served at the bottleneck rate, then crosses the path's delay; the
receiver acknowledges every packet (the ACK path is clean). A packet is declared lost once a
packet sent three later is acknowledged (RFC 9002's packet threshold). The controller sees the
calls aioquic makes, in aioquic's order: ``on_packet_sent``, ``on_packet_acked`` then
``on_rtt_measurement`` per ACK, ``on_packets_lost``. No wall clock is read.
"""

from __future__ import annotations

import heapq
import random
import ssl
from dataclasses import dataclass

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet_builder import QuicSentPacket

from tunnel.carriers.quic.config import configuration
from tunnel.core.congestion import (
    DRAIN,
    PROBE_BW,
    PROBE_RTT,
    STARTUP,
    ModelCongestionControl,
)
from tunnel.core.limits import Limits

MSS = 1452


@dataclass
class Path:
    rate: float  # bytes per second at the bottleneck
    rtt: float  # seconds, without queueing
    loss: float = 0.0  # random loss probability per packet
    queue: float = 1.0  # drop-tail queue, in BDPs


class Simulation:
    """One sender with unlimited data, the controller under test, one path."""

    def __init__(self, path: Path, seed: int = 1) -> None:
        self.path = path
        self.cc = ModelCongestionControl(max_datagram_size=MSS, rng=random.Random(seed))
        self.rng = random.Random(seed)
        self.now = 0.0
        self.events: list = []  # (time, seq, kind, packet)
        self.seq = 0
        self.next_number = 0
        self.unacked: dict[int, QuicSentPacket] = {}
        self.link_free = 0.0  # when the bottleneck finishes what it holds
        self.next_send = 0.0
        self.send_timer = None
        self.delivered_bytes = 0
        self.lost_packets = 0
        self.modes: list[str] = []
        self.trace: list[tuple[float, float, int]] = []  # (time, pacing rate, cwnd)

    def _at(self, when: float, kind: str, packet=None) -> None:
        self.seq += 1
        heapq.heappush(self.events, (when, self.seq, kind, packet))

    def _send_ready(self) -> None:
        cc = self.cc
        while cc.bytes_in_flight + MSS <= cc.congestion_window and self.next_send <= self.now:
            packet = QuicSentPacket(epoch=None, in_flight=True, is_ack_eliciting=True, is_crypto_packet=False,
                                    packet_number=self.next_number, packet_type=None, sent_time=self.now,
                                    sent_bytes=MSS)
            self.next_number += 1
            cc.on_packet_sent(packet=packet)
            self.unacked[packet.packet_number] = packet
            rate = cc.pacing_rate or cc.congestion_window / self.path.rtt
            self.next_send = max(self.next_send, self.now - 0.002) + MSS / rate  # 2 ms burst
            if self.rng.random() < self.path.loss:
                continue
            depart = max(self.now, self.link_free) + MSS / self.path.rate
            if (depart - self.now) * self.path.rate > self.path.queue * self.path.rate * self.path.rtt + MSS:
                continue  # queue full: tail drop
            self.link_free = depart
            self._at(depart + self.path.rtt, "ack", packet)
        if self.next_send > self.now and self.send_timer != self.next_send:
            self.send_timer = self.next_send  # one pending send event at a time
            self._at(self.next_send, "send")

    def _ack(self, packet: QuicSentPacket) -> None:
        if self.unacked.pop(packet.packet_number, None) is None:
            return
        self.cc.on_packet_acked(now=self.now, packet=packet)
        self.delivered_bytes += packet.sent_bytes
        self.cc.on_rtt_measurement(now=self.now, rtt=self.now - packet.sent_time)
        lost = [p for n, p in self.unacked.items() if n <= packet.packet_number - 3]
        if lost:
            for p in lost:
                del self.unacked[p.packet_number]
            self.lost_packets += len(lost)
            self.cc.on_packets_lost(now=self.now, packets=lost)

    def run(self, seconds: float) -> float:
        """Run until ``seconds`` of simulated time; return the goodput (bytes/s) of the run."""
        start_time, start_bytes = self.now, self.delivered_bytes
        end = self.now + seconds
        self._send_ready()
        while self.events and self.events[0][0] <= end:
            self.now, _, kind, packet = heapq.heappop(self.events)
            if kind == "ack":
                self._ack(packet)
            if not self.modes or self.modes[-1] != self.cc.mode:
                self.modes.append(self.cc.mode)
            self.trace.append((self.now, self.cc.pacing_rate or 0.0, self.cc.congestion_window))
            self._send_ready()
        self.now = end
        return (self.delivered_bytes - start_bytes) / (end - start_time)


MBIT = 1e6 / 8


def test_startup_finds_the_rate_then_drains_and_cruises():
    sim = Simulation(Path(rate=20 * MBIT, rtt=0.05))
    sim.run(3.0)
    assert sim.modes[:3] == [STARTUP, DRAIN, PROBE_BW]
    assert sim.cc.full_bw_reached
    assert 0.9 * 20 * MBIT <= sim.cc.bandwidth <= 1.1 * 20 * MBIT
    assert sim.cc.min_rtt == pytest.approx(0.05, rel=0.1)
    goodput = sim.run(5.0)
    assert goodput >= 0.9 * 20 * MBIT
    # the window follows the model: about 2 BDP, not the slow-start overshoot
    assert sim.cc.congestion_window <= 2.5 * 20 * MBIT * 0.05


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_one_percent_random_loss_does_not_cut_the_rate(seed):
    """The case where CUBIC/Reno fall to the Mathis bound (~0.3 Mbit/s at 1452 B, 50 ms, 1 %,
    whatever the bottleneck): the model keeps near the bottleneck rate."""
    sim = Simulation(Path(rate=20 * MBIT, rtt=0.05, loss=0.01), seed=seed)
    sim.run(3.0)
    goodput = sim.run(6.0)
    assert sim.lost_packets > 100  # the loss was there
    assert goodput >= 0.85 * 20 * MBIT
    assert sim.cc.bw_bound == float("inf")  # never took random loss for congestion (after startup)
    assert min(rate for t, rate, _ in sim.trace if t > 3.0) >= 0.5 * 20 * MBIT  # no collapse


def test_probe_rtt_every_ten_seconds_with_a_small_window():
    sim = Simulation(Path(rate=20 * MBIT, rtt=0.05))
    sim.run(12.0)
    assert PROBE_RTT in sim.modes
    assert sim.modes[-1] == PROBE_BW  # and back
    low = min(cwnd for t, _, cwnd in sim.trace if t > 9.0)
    assert low <= 0.5 * 20 * MBIT * 0.05 + 2 * MSS
    assert sim.run(2.0) >= 0.85 * 20 * MBIT  # probing RTT costs little


def test_heavy_persistent_loss_backs_off():
    """10 % loss on every round trip is more than random noise: the rate is bounded down, and
    comes back once the loss stops."""
    sim = Simulation(Path(rate=20 * MBIT, rtt=0.05))
    sim.run(3.0)
    cruising = sim.cc.pacing_rate
    sim.path.loss = 0.10
    sim.run(2.0)
    assert sim.cc.bw_bound < 0.2 * 20 * MBIT
    assert sim.cc.pacing_rate < 0.25 * cruising
    assert sim.cc.congestion_window <= sim.cc.window_bound + MSS
    sim.path.loss = 0.0
    assert sim.run(6.0) >= 0.5 * 20 * MBIT  # recovered
    assert sim.cc.bw_bound == float("inf")


def test_startup_ends_on_loss_when_the_queue_overflows():
    """A shallow queue: STARTUP's overshoot loses packets well above the threshold, which ends
    STARTUP before the bandwidth plateau would."""
    sim = Simulation(Path(rate=20 * MBIT, rtt=0.05, queue=0.1))
    sim.run(4.0)
    assert DRAIN in sim.modes
    assert sim.run(5.0) >= 0.7 * 20 * MBIT


def test_isolated_loss_leaves_the_model_alone():
    cc = ModelCongestionControl(max_datagram_size=MSS, rng=random.Random(1))
    sim = Simulation(Path(rate=20 * MBIT, rtt=0.05))
    sim.cc = cc
    sim.run(3.0)
    window, rate = cc.congestion_window, cc.pacing_rate
    packet = next(iter(sim.unacked.values()))
    del sim.unacked[packet.packet_number]
    cc.on_packets_lost(now=sim.now, packets=[packet])
    assert cc.congestion_window >= window * 0.9 and cc.pacing_rate >= rate * 0.7


def test_the_model_is_the_default_and_cubic_can_be_chosen():
    conn = QuicConnection(configuration=configuration(Limits(), is_client=True))
    assert isinstance(conn._loss._cc, ModelCongestionControl)
    cubic = Limits.from_env({"TUNNEL_QUIC_CONGESTION_CONTROL": "cubic"})
    conn = QuicConnection(configuration=configuration(cubic, is_client=True))
    assert not isinstance(conn._loss._cc, ModelCongestionControl)
    with pytest.raises(ValueError, match="quic_congestion_control"):
        Limits.from_env({"TUNNEL_QUIC_CONGESTION_CONTROL": "vegas"})
    assert QuicConfiguration(is_client=True, verify_mode=ssl.CERT_NONE).congestion_control_algorithm != "tunnel-bbr"


def test_a_zero_rtt_sample_does_not_zero_the_window():
    """uvloop's clock moves in whole milliseconds: on loopback an ACK can seem to take 0 s. The
    minimum RTT stays at the clock's granularity, so the BDP (and the window) is not 0."""
    sim = Simulation(Path(rate=1000 * MBIT, rtt=0.0005))
    sim.run(0.2)
    sim.cc.on_rtt_measurement(now=sim.now, rtt=0.0)
    assert sim.cc.min_rtt == 0.001
    sim.run(0.2)
    assert sim.cc.congestion_window >= 1.5 * sim.cc.bandwidth * 0.001
