"""A model-based congestion controller for QUIC, in the manner of BBR (sans-IO: fed the sent,
acknowledged and lost packets and ``now``; the QUIC carrier registers it with the engine).

Loss-based controllers (aioquic's Reno and CUBIC) halve their window on every loss event, so
on a long path with random loss they settle at the Mathis bound, about
``MSS / RTT * 1.22 / sqrt(p)``: 2.8 Mbit/s at 50 ms and 1 % loss, whatever the path's rate.
This controller instead keeps a model of the path, after the published BBR algorithm
(Cardwell et al., "BBR: Congestion-Based Congestion Control", ACM Queue 2016;
draft-cardwell-iccrg-bbr-congestion-control; the delivery-rate estimation draft), and takes
the loss response of BBR v2 in a simple form:

- **bottleneck bandwidth**: the largest delivery rate sampled over the last
  :data:`BW_WINDOW_ROUNDS` round trips. A sample is the bytes acknowledged between a packet's
  sending and its acknowledgement, over the longer of the send and ACK intervals;
- **minimum round trip**: the smallest RTT seen in :data:`MIN_RTT_WINDOW` seconds;
- **pacing rate** = gain x bandwidth, **window** = gain x bandwidth x min RTT (the BDP), with a
  floor of :data:`MIN_WINDOW_PACKETS` datagrams;
- **modes**: STARTUP (gain 2/ln 2, doubles the rate each round until the bandwidth stops
  growing 25 % over three rounds), DRAIN (empties the queue STARTUP built), PROBE_BW (cycles
  the pacing gain 1.25, 0.75, then six rounds at 1), PROBE_RTT (when the minimum RTT has not
  been refreshed for :data:`MIN_RTT_WINDOW` seconds: window down to half a BDP for
  :data:`PROBE_RTT_TIME`, so that a standing queue cannot inflate the estimate forever);
- **loss**: an isolated random loss changes nothing (the lost bytes are simply not counted as
  delivered). Losses are counted from round end to round end until :data:`LOSS_MIN_PACKETS`
  packets were lost (or :data:`LOSS_SAMPLE_PACKETS` were sent, then the count starts over): if
  more than :data:`LOSS_THRESHOLD` of the bytes were lost, that is congestion: STARTUP ends, and
  the bandwidth and the window are bounded at :data:`LOSS_BETA` of their values (again at each
  such verdict); each round trip that loses less than the threshold lifts the bounds by
  :data:`BOUND_GROWTH` until they no longer bind.

Not modelled: application-limited samples are not marked (a sample taken while the sender had
nothing to send is low, and the max filter ignores it unless the link stays idle-ish for
:data:`BW_WINDOW_ROUNDS` rounds); ACK aggregation is absorbed by the PROBE_BW window gain of 2.

The controller has the interface of aioquic's congestion controllers (``QuicCongestionControl``:
``congestion_window``, ``bytes_in_flight``, ``ssthresh`` and the ``on_*`` calls, reading the sent
packets' public fields); :mod:`tunnel.carriers.quic.config` registers it under :data:`NAME`
with aioquic's public ``register_congestion_control``.
aioquic paces at window / smoothed RTT, so the window's gain is the pacing gain in effect;
:attr:`ModelCongestionControl.pacing_rate` is the model's own figure, for logs.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable


__all__ = ["NAME", "ModelCongestionControl"]

#: The name this controller is registered under in aioquic (QuicConfiguration's
#: ``congestion_control_algorithm``), apart from any "bbr" a later aioquic may bring.
NAME = "tunnel-bbr"

STARTUP_GAIN = 2 / math.log(2)  # the smallest gain that doubles the delivery rate each round
DRAIN_GAIN = 1 / STARTUP_GAIN
PROBE_BW_CWND_GAIN = 2.0
#: PROBE_BW pacing gains, one round trip (min RTT) each.
PROBE_BW_GAINS = (1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
BW_WINDOW_ROUNDS = 10
MIN_RTT_WINDOW = 10.0
#: Smallest RTT sample taken (aioquic's K_GRANULARITY).
MIN_RTT_SAMPLE = 0.001
PROBE_RTT_TIME = 0.2
FULL_BW_GROWTH = 1.25
FULL_BW_ROUNDS = 3
MIN_WINDOW_PACKETS = 4
#: The window before the first acknowledgement (RFC 9002's initial window).
INITIAL_WINDOW_PACKETS = 10
#: Extra datagrams in the window beyond gain x BDP (ACKs arrive in batches).
WINDOW_QUANTA = 3
LOSS_THRESHOLD = 0.02
#: Lost packets that make a loss rate a verdict: with fewer, 1 % random loss over a small round
#: would read above 2 % often (2 lost of 86 packets, one round of 20 Mbit/s x 50 ms).
LOSS_MIN_PACKETS = 20
#: Packets after which the loss count starts over without a verdict.
LOSS_SAMPLE_PACKETS = 1000
LOSS_BETA = 0.7
BOUND_GROWTH = 1.25

STARTUP, DRAIN, PROBE_BW, PROBE_RTT = "startup", "drain", "probe_bw", "probe_rtt"


class ModelCongestionControl:
    """BBR-style controller (see the module docstring) behind aioquic's interface.

    aioquic calls ``on_packet_acked`` for each packet an ACK frame newly acknowledges, then
    ``on_rtt_measurement`` once for the frame: per-packet work is a few additions, and the
    model (filters, mode, window, pacing rate) is updated once per ACK frame.
    """

    def __init__(self, *, max_datagram_size: int, rng: random.Random | None = None) -> None:
        self.congestion_window = INITIAL_WINDOW_PACKETS * max_datagram_size
        self.bytes_in_flight = 0
        self.ssthresh: int | None = None  # not used: for the engine's logs
        self._max_datagram_size = max_datagram_size
        self._rng = rng or random.Random()
        #: Bytes per second the model would pace at; None until the first RTT is known.
        self.pacing_rate: float | None = None
        #: The delivery state when each packet in flight was sent, by packet number.
        self._sent_state: dict[int, tuple] = {}
        self._newest_state: tuple | None = None
        self.mode = STARTUP
        self.round_count = 0
        # delivery-rate estimation
        self._delivered = 0
        self._delivered_time = 0.0
        self._first_sent_time = 0.0
        self._acked_pending = 0  # bytes acknowledged since the model last moved
        self._next_round_delivered = 0
        self._round_start = False
        # the model
        self._bw_samples = [0.0] * BW_WINDOW_ROUNDS  # per-round maxima, ring by round
        self._bw_rounds = [-1] * BW_WINDOW_ROUNDS
        self.max_bw = 0.0
        self.min_rtt: float | None = None
        self._min_rtt_stamp = 0.0
        self._min_rtt_expired = False
        # startup
        self._full_bw = 0.0
        self._full_bw_count = 0
        self.full_bw_reached = False
        # probe_bw / probe_rtt
        self._cycle_index = 0
        self._cycle_start = 0.0
        self._probe_rtt_done = None
        self._prior_window = 0
        # loss: counts since the last verdict, in this round, and the bounds they set
        self._lost_packets = 0
        self._sampled_packets = 0
        self._lost = 0
        self._delivered_since = 0
        self._round_lost = 0
        self._round_delivered = 0
        self.bw_bound = math.inf
        self.window_bound = math.inf

    # --- derived values ---------------------------------------------------------------

    @property
    def bandwidth(self) -> float:
        """The model's bandwidth (bytes per second): the max filter, under the loss bound."""
        return min(self.max_bw, self.bw_bound)

    @property
    def pacing_gain(self) -> float:
        if self.mode == STARTUP:
            return STARTUP_GAIN
        if self.mode == DRAIN:
            return DRAIN_GAIN
        if self.mode == PROBE_BW:
            return PROBE_BW_GAINS[self._cycle_index]
        return 1.0

    def _bdp(self, gain: float = 1.0) -> float:
        return gain * self.bandwidth * (self.min_rtt or 0.0)

    def _min_window(self) -> int:
        return MIN_WINDOW_PACKETS * self._max_datagram_size

    # --- aioquic's interface ----------------------------------------------------------

    def on_packet_sent(self, *, packet) -> None:
        if not self.bytes_in_flight:
            self._first_sent_time = self._delivered_time = packet.sent_time
        self._sent_state[packet.packet_number] = (self._delivered, self._delivered_time, self._first_sent_time,
                                                  packet.sent_time)
        self.bytes_in_flight += packet.sent_bytes

    def on_packet_acked(self, *, now: float, packet) -> None:
        size = packet.sent_bytes
        self.bytes_in_flight -= size
        self._delivered += size
        self._delivered_time = now
        self._acked_pending += size
        self._round_delivered += size
        self._delivered_since += size
        self._sampled_packets += 1
        state = self._sent_state.pop(packet.packet_number, None)
        newest = self._newest_state
        if state is not None and (newest is None or state[3] >= newest[3]):
            self._newest_state = state

    def on_packets_expired(self, *, packets: Iterable) -> None:
        for packet in packets:
            self.bytes_in_flight -= packet.sent_bytes
            self._sent_state.pop(packet.packet_number, None)

    def on_packets_lost(self, *, now: float, packets: Iterable) -> None:
        for packet in packets:
            self.bytes_in_flight -= packet.sent_bytes
            self._sent_state.pop(packet.packet_number, None)
            self._round_lost += packet.sent_bytes
            self._lost += packet.sent_bytes
            self._lost_packets += 1
            self._sampled_packets += 1
        if self._newest_state is not None:
            self._update(now, None)

    def on_persistent_congestion(self) -> None:
        self._apply_loss_bound()
        self.congestion_window = self._min_window()

    def on_rtt_measurement(self, *, now: float, rtt: float) -> None:
        self._update(now, rtt)

    def get_log_data(self) -> dict:
        data = {"cwnd": self.congestion_window, "bytes_in_flight": self.bytes_in_flight}
        data.update(mode=self.mode, bw=self.bandwidth, min_rtt=self.min_rtt, pacing_rate=self.pacing_rate)
        return data

    # --- the model --------------------------------------------------------------------

    def _update(self, now: float, rtt: float | None) -> None:
        if rtt is not None:
            self._update_min_rtt(now, rtt)
        state = self._newest_state
        acked = self._acked_pending
        self._newest_state = None
        self._acked_pending = 0
        if state is not None:
            self._sample(now, state)
        if self._round_start:
            self._on_round_end()
        self._update_mode(now)
        self._update_pacing()
        self._update_window(acked)

    def _update_min_rtt(self, now: float, rtt: float) -> None:
        # As aioquic's own estimate: never below the clock's granularity (uvloop's clock moves
        # in whole milliseconds; a 0.0 sample on loopback would make the BDP, and the window, 0).
        rtt = max(rtt, MIN_RTT_SAMPLE)
        self._min_rtt_expired = self.min_rtt is not None and now > self._min_rtt_stamp + MIN_RTT_WINDOW
        if self.min_rtt is None or rtt <= self.min_rtt or self._min_rtt_expired:
            self.min_rtt = rtt
            self._min_rtt_stamp = now

    def _sample(self, now: float, state: tuple) -> None:
        delivered, delivered_time, first_sent_time, sent_time = state
        self._round_start = False
        if delivered >= self._next_round_delivered:
            self._next_round_delivered = self._delivered
            self.round_count += 1
            self._round_start = True
        self._first_sent_time = sent_time
        interval = max(sent_time - first_sent_time, now - delivered_time)
        if interval <= 0 or (self.min_rtt is not None and interval < self.min_rtt):
            return  # too short to say anything about the path's rate
        rate = (self._delivered - delivered) / interval
        slot = self.round_count % BW_WINDOW_ROUNDS
        if self._bw_rounds[slot] != self.round_count:
            self._bw_rounds[slot] = self.round_count
            self._bw_samples[slot] = rate
            oldest = self.round_count - BW_WINDOW_ROUNDS
            self.max_bw = max(s for s, r in zip(self._bw_samples, self._bw_rounds) if r > oldest)
        elif rate > self._bw_samples[slot]:
            self._bw_samples[slot] = rate
        self.max_bw = max(self.max_bw, rate)

    def _on_round_end(self) -> None:
        self._round_start = False
        lost, delivered = self._lost, self._delivered_since
        if self._lost_packets >= LOSS_MIN_PACKETS and lost > LOSS_THRESHOLD * (lost + delivered):
            self._apply_loss_bound()
            if self.mode == STARTUP:
                self.full_bw_reached = True
            self._lost = self._delivered_since = self._lost_packets = self._sampled_packets = 0
        elif self._lost_packets >= LOSS_MIN_PACKETS or self._sampled_packets >= LOSS_SAMPLE_PACKETS:
            self._lost = self._delivered_since = self._lost_packets = self._sampled_packets = 0
        if self._round_lost <= LOSS_THRESHOLD * (self._round_lost + self._round_delivered):
            self._relax_loss_bound()
        self._round_lost = self._round_delivered = 0
        if not self.full_bw_reached:
            if self.max_bw >= self._full_bw * FULL_BW_GROWTH:
                self._full_bw = self.max_bw
                self._full_bw_count = 0
            else:
                self._full_bw_count += 1
                self.full_bw_reached = self._full_bw_count >= FULL_BW_ROUNDS

    def _apply_loss_bound(self) -> None:
        floor = self._min_window()
        self.bw_bound = LOSS_BETA * min(self.bw_bound, self.max_bw)
        if self.min_rtt:
            self.bw_bound = max(self.bw_bound, floor / self.min_rtt)
        self.window_bound = max(floor, LOSS_BETA * min(self.window_bound, self.congestion_window))

    def _relax_loss_bound(self) -> None:
        if self.bw_bound != math.inf:
            self.bw_bound *= BOUND_GROWTH
            if self.bw_bound >= self.max_bw:
                self.bw_bound = math.inf
        if self.window_bound != math.inf:
            self.window_bound *= BOUND_GROWTH
            if self.window_bound >= self._bdp(2 * PROBE_BW_CWND_GAIN) + self._min_window():
                self.window_bound = math.inf

    def _update_mode(self, now: float) -> None:
        mode = self.mode
        if mode == STARTUP and self.full_bw_reached:
            self.mode = mode = DRAIN
        if mode == DRAIN and self.bytes_in_flight <= self._bdp():
            self._enter_probe_bw(now)
        elif mode == PROBE_BW:
            self._advance_cycle(now)
        if self._min_rtt_expired and self.mode != PROBE_RTT:
            self._min_rtt_expired = False
            self.mode = PROBE_RTT
            self._prior_window = self.congestion_window
            self._probe_rtt_done = None
        if self.mode == PROBE_RTT:
            self._probe_rtt(now)

    def _enter_probe_bw(self, now: float) -> None:
        self.mode = PROBE_BW
        # start anywhere in the cycle but in the 0.75 phase (as published)
        self._cycle_index = self._rng.choice([i for i in range(len(PROBE_BW_GAINS)) if i != 1])
        self._cycle_start = now

    def _advance_cycle(self, now: float) -> None:
        elapsed = now - self._cycle_start > (self.min_rtt or 0.0)
        if PROBE_BW_GAINS[self._cycle_index] < 1.0:
            elapsed = elapsed or self.bytes_in_flight <= self._bdp()
        if elapsed:
            self._cycle_index = (self._cycle_index + 1) % len(PROBE_BW_GAINS)
            self._cycle_start = now

    def _probe_rtt(self, now: float) -> None:
        if self._probe_rtt_done is None:
            if self.bytes_in_flight <= self._probe_rtt_window():
                self._probe_rtt_done = now + max(PROBE_RTT_TIME, self.min_rtt or 0.0)
        elif now >= self._probe_rtt_done:
            self._min_rtt_stamp = now
            self.congestion_window = max(self.congestion_window, self._prior_window)
            if self.full_bw_reached:
                self._enter_probe_bw(now)
            else:
                self.mode = STARTUP

    def _probe_rtt_window(self) -> int:
        return max(self._min_window(), int(self._bdp(0.5)))

    def _update_pacing(self) -> None:
        if self.min_rtt is None:
            return
        if self.bandwidth:
            rate = self.pacing_gain * self.bandwidth
        else:
            rate = STARTUP_GAIN * self.congestion_window / max(self.min_rtt, 1e-6)
        if self.full_bw_reached or self.pacing_rate is None or rate > self.pacing_rate:
            self.pacing_rate = rate

    def _update_window(self, acked: int) -> None:
        window = self.congestion_window
        gain = STARTUP_GAIN if self.mode in (STARTUP, DRAIN) else PROBE_BW_CWND_GAIN
        if self.bandwidth and self.min_rtt is not None:
            target = self._bdp(gain) + WINDOW_QUANTA * self._max_datagram_size
            if self.full_bw_reached:
                window = min(window + acked, target)
            elif window < target or self._delivered < 10 * self._max_datagram_size:
                window += acked
        else:
            window += acked
        window = max(window, self._min_window())
        if window > self.window_bound:
            window = max(self._min_window(), int(self.window_bound))
        if self.mode == PROBE_RTT:
            window = min(window, self._probe_rtt_window())
        self.congestion_window = int(window)

