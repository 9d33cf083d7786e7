"""A QUIC peer cannot make the relay hold more than its receive windows by leaving gaps.

The hostile client (tests/helpers/quic_gap.py) sends, on several streams, one byte at the
furthest offset the relay's MAX_STREAM_DATA and MAX_DATA allow, waits for new limits, and
does it again. A receiver that raises its limits when data arrives (aioquic's own rule:
double once half of a limit has arrived) zero-fills exponentially growing buffers for a few
tiny packets: a plain aioquic server with 4 MiB / 1 MiB windows grew by 440-590 MiB of RSS in
0.2-0.3 s and 18 datagrams (the client stopped at 512 MiB of offsets). The relay may
close such a link with any error; what it may not do is hold more than the documented bound
(docs/LIMITS.md: 2 x SESSION_WINDOW + MAX_STREAM_WINDOW per link), or stop serving another
customer meanwhile.

Small windows keep the bound (and the test) small; the client stops at ``CAP`` bytes of
offsets, well above the bound, so that an unbounded receiver fails the test without taking
the machine down.
"""

from __future__ import annotations

import asyncio
import threading
import time
import tracemalloc

import pytest

from tests.faults.faultkit import rss_kib, serves, setup_agent
from tests.helpers.processes import Agents, PrivateService, Relay, connect
from tests.helpers.quic_gap import open_gap_attacker
from tunnel.core.limits import Limits

MiB = 1024 * 1024
LIMITS = Limits(session_window=4 * MiB, initial_stream_window=1 * MiB, max_stream_window=2 * MiB)
#: docs/LIMITS.md: unconsumed received data per link is at most this.
BOUND = 2 * LIMITS.session_window + LIMITS.max_stream_window
#: What the relay's RSS may grow by besides (a link's state, TLS, allocator slack, the
#: well-behaved agent's traffic meanwhile).
SLACK = 24 * MiB
#: The client stops once the relay would have to account for this many bytes of offsets.
CAP = 160 * MiB
STREAMS = 8
ATTACK_SECONDS = 5.0
MAX_DATAGRAMS = 2000
RELAY_ENV = {"TUNNEL_SESSION_WINDOW": str(LIMITS.session_window),
             "TUNNEL_INITIAL_STREAM_WINDOW": str(LIMITS.initial_stream_window),
             "TUNNEL_MAX_STREAM_WINDOW": str(LIMITS.max_stream_window)}


class PeakRss:
    """The largest RSS of a process from now on: the kernel's high-water mark, reset here
    (``clear_refs``), and samples taken on every attack round in case it cannot be reset."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before = rss_kib(pid) * 1024
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")
            self.hwm = True
        except OSError:
            self.hwm = False
        self.sampled = self.before

    def sample(self) -> None:
        try:
            self.sampled = max(self.sampled, rss_kib(self.pid) * 1024)
        except (OSError, AssertionError):
            pass

    def growth(self) -> int:
        self.sample()
        peak = self.sampled
        if self.hwm:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) * 1024)
        return peak - self.before


class Prober:
    """Echoes through a well-behaved customer's endpoint, over and over, from a thread."""

    def __init__(self, addr) -> None:
        self.addr = addr
        self.results: list[tuple[float, bool]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            self.results.append((time.monotonic(), serves(self.addr, b"probe %d" % n)))
            self._stop.wait(0.1)  # pacing between probes, not a wait for state

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(15)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A relay with small windows, and a customer's agent on QUIC serving an echo service."""
    workdir = tmp_path_factory.mktemp("quic-gap")
    relay = Relay(workdir)
    agents = Agents(workdir)
    service = PrivateService("echo")
    try:
        relay.start(**RELAY_ENV)
        _customer, _token, _agent, addr = setup_agent(relay, agents, service, transport="quic", name="db",
                                                      customer_name="acme")
        assert serves(addr)
        yield relay, addr
    finally:
        agents.stop_all()
        relay.stop()
        service.close()


def _check(what: str, report, growth: int, prober: Prober, relay: Relay) -> None:
    print(f"{what}: relay RSS +{growth / MiB:.1f} MiB (bound {BOUND / MiB:.0f} MiB + slack {SLACK / MiB:.0f}); "
          f"{report.datagrams_sent} datagrams, {report.probes} probes, offsets {report.offsets_sent / MiB:.1f} MiB, "
          f"MAX_DATA {report.max_data / MiB:.1f} MiB, MAX_STREAM_DATA {report.max_stream_data / MiB:.1f} MiB "
          f"in {report.seconds:.2f}s; closed by the relay: {report.closed}")
    assert relay.proc.alive(), relay.proc.log()[-3000:]
    assert growth <= BOUND + SLACK, (
        f"{what}: the relay's RSS grew by {growth / MiB:.1f} MiB (> {(BOUND + SLACK) / MiB:.0f} MiB) for "
        f"{report.datagrams_sent} datagrams; it granted MAX_DATA {report.max_data / MiB:.1f} MiB")
    failed = [t for t, ok in prober.results if not ok]
    assert prober.results and not failed, f"{what}: the other customer's echoes failed {len(failed)} times"


def test_gaps_before_authentication_stay_within_the_windows(setup):
    relay, addr = setup

    async def main():
        attacker = await open_gap_attacker("127.0.0.1", relay.port)
        try:
            peak = PeakRss(relay.proc.pid)
            report = await attacker.attack([4 * i for i in range(STREAMS)], seconds=ATTACK_SECONDS,
                                           max_datagrams=MAX_DATAGRAMS, cap=CAP, on_round=peak.sample)
            return report, peak.growth()
        finally:
            attacker.close()

    with Prober(addr) as prober:
        report, growth = asyncio.run(main())
    _check("before auth", report, growth, prober, relay)
    assert serves(addr)


def test_gaps_after_authentication_stay_within_the_windows(setup):
    """The same on an authenticated agent link: on its control stream and on the streams the
    relay opened towards it for a worker's connections."""
    relay, addr = setup
    customer = relay.create_customer("mallory")
    token = relay.jwt("--customer-id", customer)
    workers = []

    async def main():
        attacker = await open_gap_attacker("127.0.0.1", relay.port)
        try:
            answer = await attacker.authenticate(token, "hostile")
            assert answer.get("type") == "registered", answer
            host, port = await asyncio.to_thread(lambda: relay.wait_available(customer, "hostile") and
                                                 relay.endpoint(customer, "hostile"))
            for _ in range(STREAMS - 1):
                workers.append(await asyncio.to_thread(connect, (host, port), 10))
            await attacker.wait_for(lambda: attacker.closed or len(attacker.peer_streams()) >= STREAMS - 1, 10,
                                    "the relay to open streams for the workers")
            streams = [0, *attacker.peer_streams()]
            peak = PeakRss(relay.proc.pid)
            report = await attacker.attack(streams, seconds=ATTACK_SECONDS, max_datagrams=MAX_DATAGRAMS, cap=CAP,
                                           on_round=peak.sample)
            return report, peak.growth()
        finally:
            attacker.close()

    try:
        with Prober(addr) as prober:
            report, growth = asyncio.run(main())
    finally:
        for w in workers:
            w.close()
    _check("after auth", report, growth, prober, relay)
    assert serves(addr)


def test_gaps_then_resets_after_authentication_are_freed(setup):
    """Gaps on streams of the agent's own, each reset (final size: the gap's end) once the
    relay answered and replaced by a new stream: connection credit that comes back for the
    reset streams must come with their buffers freed."""
    relay, addr = setup
    customer = relay.create_customer("mallory-resets")
    token = relay.jwt("--customer-id", customer)

    async def main():
        attacker = await open_gap_attacker("127.0.0.1", relay.port)
        try:
            answer = await attacker.authenticate(token, "hostile")
            assert answer.get("type") == "registered", answer
            peak = PeakRss(relay.proc.pid)
            report = await attacker.attack([4 * i for i in range(1, STREAMS + 1)], seconds=ATTACK_SECONDS,
                                           max_datagrams=MAX_DATAGRAMS, cap=CAP, renew=True, on_round=peak.sample)
            return report, peak.growth()
        finally:
            attacker.close()

    with Prober(addr) as prober:
        report, growth = asyncio.run(main())
    _check(f"resets after auth ({report.streams} streams)", report, growth, prober, relay)
    assert serves(addr)


def test_gaps_against_serve_quic_in_process(tmp_path):
    """The carrier alone (``serve_quic``, links never authenticated): what the gaps make it
    allocate, by tracemalloc, stays within the windows."""
    from tests.helpers import make_pki
    from tunnel.carriers.quic import serve_quic

    pki = make_pki(tmp_path / "pki")
    links = []

    async def main():
        server = await serve_quic("127.0.0.1", 0, cert_file=str(pki.cert_file), key_file=str(pki.key_file),
                                  limits=LIMITS, on_link=links.append)
        attacker = None
        try:
            attacker = await open_gap_attacker("127.0.0.1", server.port)
            tracemalloc.start()
            try:
                base = tracemalloc.get_traced_memory()[0]
                report = await attacker.attack([4 * i for i in range(STREAMS)], seconds=ATTACK_SECONDS,
                                               max_datagrams=MAX_DATAGRAMS, cap=CAP)
                peak = tracemalloc.get_traced_memory()[1] - base
            finally:
                tracemalloc.stop()
            return report, peak
        finally:
            if attacker is not None:
                attacker.close()
            server.close()
            await server.wait_closed()

    report, peak = asyncio.run(main())
    print(f"serve_quic: traced peak +{peak / MiB:.1f} MiB (bound {BOUND / MiB:.0f} MiB); "
          f"{report.datagrams_sent} datagrams, offsets {report.offsets_sent / MiB:.1f} MiB, "
          f"MAX_DATA {report.max_data / MiB:.1f} MiB; closed: {report.closed}")
    assert peak <= BOUND + 4 * MiB, f"serve_quic allocated {peak / MiB:.1f} MiB for {report.datagrams_sent} datagrams"
