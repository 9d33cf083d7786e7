"""The choice ``auto://`` makes (tunnel.bridge.dial.Dialer), with fake carriers and a fake clock:
WSS when it can be dialled, QUIC only when it cannot, WSS again on the re-probe interval."""

from __future__ import annotations

import asyncio

import pytest

from tunnel.bridge import dial
from tunnel.core.limits import Limits
from tunnel.wire.errors import LinkError

LIMITS = Limits(quic_probe_timeout=1.0, quic_reprobe_interval=30.0)


class FakeLink:
    def __init__(self, carrier: str) -> None:
        self.carrier = carrier


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(dial.time, "monotonic", fake.monotonic)
    return fake


def dialer(url: str = "auto://relay.example:8443", *, wss: bool, quic: bool):
    """A Dialer whose carriers are fakes: each either gives a link or fails; ``tried`` lists the
    attempts in order, with the timeout QUIC was given."""
    d = dial.Dialer(url, ca_file=None, limits=LIMITS, proxy_env={})
    d.reachable = {"wss": wss, "quic": quic}
    d.tried = []

    async def fake_wss():
        d.tried.append("wss")
        if not d.reachable["wss"]:
            raise LinkError("connection refused") from ConnectionRefusedError(111, "Connection refused")
        return FakeLink("wss")

    async def fake_quic(timeout):
        d.tried.append(("quic", timeout))
        if not d.reachable["quic"]:
            raise LinkError(f"QUIC connection timed out after {timeout} s")
        return FakeLink("quic")

    d._wss, d._quic = fake_wss, fake_quic
    return d


def test_auto_takes_wss_and_never_tries_quic_when_wss_works(clock):
    d = dialer(wss=True, quic=True)
    link = asyncio.run(d.dial())
    assert link.carrier == d.carrier == "wss"
    assert d.tried == ["wss"]
    assert d.next_probe_in() is None  # nothing better to move to


def test_auto_falls_back_to_quic_with_the_probe_timeout(clock):
    d = dialer(wss=False, quic=True)
    link = asyncio.run(d.dial())
    assert link.carrier == d.carrier == "quic"
    assert d.tried == ["wss", ("quic", 1.0)]
    assert d.last_wss_error == "connection refused"


def test_auto_with_both_failing_raises_naming_both(clock):
    d = dialer(wss=False, quic=False)
    both = r"connection refused \(QUIC too: QUIC connection timed out after 1.0 s\)"
    with pytest.raises(LinkError, match=both) as info:
        asyncio.run(d.dial())
    # WSS's failure, with its own cause, is what the agent's diagnosis (agent.hints) reads.
    assert isinstance(info.value.__cause__.__cause__, ConnectionRefusedError)


def test_on_quic_wss_is_retried_on_the_interval_and_taken_when_it_answers(clock):
    d = dialer(wss=False, quic=True)
    asyncio.run(d.dial())
    assert d.next_probe_in() == 30.0
    clock.now += 29.5
    assert d.next_probe_in() == pytest.approx(0.5)
    clock.now += 0.5
    assert d.next_probe_in() == 0
    assert asyncio.run(d.probe_wss()) is None  # still refused: the interval restarts
    assert d.carrier == "quic" and d.next_probe_in() == 30.0
    d.reachable["wss"] = True
    clock.now += 30
    link = asyncio.run(d.probe_wss())
    assert link.carrier == d.carrier == "wss"
    assert d.next_probe_in() is None


def test_each_dial_tries_wss_first_again(clock):
    """A QUIC link lost (a silent path): the next dial goes back to WSS first."""
    d = dialer(wss=False, quic=True)
    asyncio.run(d.dial())
    d.reachable["wss"] = True
    d.tried.clear()
    assert asyncio.run(d.dial()).carrier == "wss" and d.tried == ["wss"]


@pytest.mark.parametrize("scheme", ["wss", "quic"])
def test_explicit_schemes_use_only_their_carrier(clock, scheme):
    d = dialer(f"{scheme}://relay.example:8443", wss=True, quic=True)
    assert asyncio.run(d.dial()).carrier == scheme
    assert [t if isinstance(t, str) else t[0] for t in d.tried] == [scheme]
    assert d.next_probe_in() is None
