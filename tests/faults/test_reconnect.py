"""Agents coming back after a relay restart: spread out (no thundering herd), and all of them.

500 agent processes are too heavy for a shared 2-core box, so the schedule is checked
statistically in-process with the agent's own :class:`agent.runner.Backoff`, driven the way
``Agent._run`` drives it; a real-process check then brings 20 agents back after a SIGKILL.
"""

from __future__ import annotations

import random
import time
from collections import Counter

import pytest

from agent.runner import Agent, Backoff
from tests.faults.faultkit import FAST, serves, wait_until

FLEET = 500


def first_reconnects(down_for: float, seed: int, healthy_for: float = 3600.0) -> list[float]:
    """When each of FLEET agents first reaches a relay that vanished at t=0 and answers again
    from ``down_for`` on. Every agent had a healthy link; each follows ``Agent._run``: after
    the link drops, reset if it was up HEALTHY_PERIOD, ``link_lost()``, then sleep
    ``next_delay()`` between attempts (a refused dial fails at once)."""
    times = []
    for i in range(FLEET):
        backoff = Backoff(rng=random.Random(seed * 1_000_003 + i))
        if healthy_for >= Agent.HEALTHY_PERIOD:
            backoff.reset()
        backoff.link_lost()
        t = backoff.next_delay()
        while t < down_for:
            t += backoff.next_delay()
        times.append(t)
    return times


@pytest.mark.parametrize("down_for", [0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 120.0])
def test_500_agents_spread_their_reconnects(down_for):
    worst = 0
    for seed in range(5):
        times = first_reconnects(down_for, seed)
        per_second = Counter(int(t - down_for) for t in times)
        busiest = max(per_second.values())
        worst = max(worst, busiest)
        assert busiest <= FLEET // 5, (
            f"relay down {down_for}s, seed {seed}: {busiest} of {FLEET} agents reconnect in one second "
            f"(histogram {sorted(per_second.items())[:12]})")
        assert max(times) - down_for <= 2 * 30.0, "an agent waited longer than two capped delays"
    print(f"down {down_for}s: busiest second holds {worst} of {FLEET} agents")


def test_flapping_links_back_off_and_healthy_links_start_over():
    b = Backoff(rng=random.Random(7))
    b.link_lost()
    first = [b.next_delay() for _ in range(3)]
    assert 1.0 <= first[0] <= 10.0
    b.link_lost()  # a short-lived link: keep growing, do not start over
    assert b.attempt == 3
    b.reset()  # a healthy link: start from the spread again once it drops
    b.link_lost()
    assert b.attempt == 0 and b.next_delay() <= 10.0


def test_twenty_agents_all_return_after_relay_restart(relay, agents, service_factory):
    service = service_factory("echo")
    customer = relay.create_customer("fleet")
    token = relay.jwt("--customer-id", customer)
    for _ in range(20):
        agents.start(f"wss://127.0.0.1:{relay.port}", token, "db", service.port, ca_file=relay.ca_file, **FAST)
    relay.wait_available(customer, "db", agents=20, timeout=90)
    addr = relay.endpoint(customer, "db")
    relay.proc.kill()
    relay.start(**FAST)
    t0 = time.monotonic()
    relay.wait_available(customer, "db", agents=20, timeout=60)
    print(f"20 agents back {time.monotonic() - t0:.1f}s after the relay restarted")
    assert all(p.alive() for p in agents.procs)
    wait_until(lambda: serves(addr), 10, "the resource to serve")
