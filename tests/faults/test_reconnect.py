"""Agents coming back after a relay restart: quickly, all of them, and without a storm.

The rule: an agent's first reconnect after a link loss comes within ``AgentSettings.reconnect_delay``
(1 s, jittered); only repeated failures back off (doubling to 30 s). A fleet that comes back in
the same second is spread by the relay's handshake admission (tunnel.carriers.handshakes:
``max_pending_handshakes`` slots, stale ones evicted, newcomers beyond refused), not by making
every agent wait: agents the relay turns away back off.

500 agent processes are too heavy for a shared 2-core box, so the fleet is simulated in-process
with the agent's own :class:`agent.runner.Backoff`, driven the way ``Agent._run`` drives it, and
the relay's own :class:`PendingHandshakes`, in front of a relay that completes
``HANDSHAKES_PER_SECOND`` handshakes one after another (TLS, upgrade, JWT, registration: about
5 ms of CPU each). The simulation asserts, for outages of 0 s to 2 minutes: every agent tries
within a second of the loss; the relay never holds more handshakes than its limit; the attempts
that reach the running relay stay within a few per agent; every agent is back within seconds of
a short outage, and within two capped delays of a long one. A real-process check then brings 20
agents back after a SIGKILL.
"""

from __future__ import annotations

import collections
import heapq
import random
import time

import pytest

from agent.runner import Backoff
from agent.settings import DEFAULT_AGENT_SETTINGS as AGENT
from tests.faults.faultkit import FAST, serves, wait_until
from tunnel.carriers.handshakes import PendingHandshakes
from tunnel.core.limits import DEFAULT_LIMITS

FLEET = 500
HANDSHAKES_PER_SECOND = 200


class Fleet:
    """FLEET agents whose links dropped at t=0 towards a relay that answers from ``down_for`` on."""

    def __init__(self, down_for: float, seed: int, fleet: int = FLEET) -> None:
        limits = DEFAULT_LIMITS
        self.down_for = down_for
        self.backoffs = [Backoff(AGENT.reconnect_delay, AGENT.reconnect_max_delay,
                                 random.Random(seed * 1_000_003 + i)) for i in range(fleet)]
        self.pending = PendingHandshakes(limits.max_pending_handshakes)
        self.events: list = []
        self.seq = 0
        self.first_attempt: dict[int, float] = {}
        self.back: dict[int, float] = {}
        self.attempts_on_relay = 0  # attempts while the relay runs (they cost it something)
        self.max_pending = 0
        self.now = 0.0

    def push(self, at: float, kind: str, item) -> None:
        self.seq += 1
        heapq.heappush(self.events, (at, self.seq, kind, item))

    def retry(self, agent: int) -> None:
        self.push(self.now + self.backoffs[agent].next_delay(), "attempt", agent)

    def run(self) -> "Fleet":
        queue = collections.deque()  # admitted handshakes waiting for the relay's CPU, in order
        busy = False

        class Handshake:
            __slots__ = ("agent", "live")

            def __init__(self, agent: int) -> None:
                self.agent, self.live = agent, True

        def evict(handshake) -> None:
            handshake.live = False
            self.retry(handshake.agent)

        def next_handshake() -> None:
            nonlocal busy
            while queue and not queue[0].live:
                queue.popleft()
            busy = bool(queue)
            if busy:
                self.push(self.now + 1 / HANDSHAKES_PER_SECOND, "done", queue.popleft())

        for agent in range(len(self.backoffs)):
            self.retry(agent)  # the link dropped: the first attempt
        while self.events:
            self.now, _, kind, item = heapq.heappop(self.events)
            if kind == "done":
                if item.live:
                    self.pending.forget(item)
                    self.back[item.agent] = self.now
                next_handshake()
                continue
            self.first_attempt.setdefault(item, self.now)
            if self.now < self.down_for:
                self.retry(item)  # connection refused at once
                continue
            self.attempts_on_relay += 1
            if not self.pending.make_room(self.now, evict):
                self.retry(item)  # refused: every slot holds a handshake younger than a second
                continue
            handshake = Handshake(item)
            self.pending.admit(handshake, item, self.now)  # one source address per agent
            self.max_pending = max(self.max_pending, len(self.pending))
            queue.append(handshake)
            if not busy:
                next_handshake()
        return self


@pytest.mark.parametrize("down_for", [0.0, 0.5, 2.0, 10.0, 120.0])
def test_500_agents_return_fast_and_the_relay_spreads_the_herd(down_for):
    limits = DEFAULT_LIMITS
    worst = 0.0
    for seed in range(5):
        fleet = Fleet(down_for, seed).run()
        assert len(fleet.back) == FLEET, f"seed {seed}: {FLEET - len(fleet.back)} agents never came back"
        assert max(fleet.first_attempt.values()) <= AGENT.reconnect_delay, "an agent waited over a second to try"
        assert fleet.max_pending <= limits.max_pending_handshakes
        assert fleet.attempts_on_relay <= 4 * FLEET, f"seed {seed}: {fleet.attempts_on_relay} attempts hit the relay"
        last = max(fleet.back.values()) - down_for
        worst = max(worst, last)
        if down_for <= 2.0:
            # The relay's throughput (2.5 s for 500) plus the delays of a few refusals.
            assert last <= 10.0, f"seed {seed}: the last agent came back {last:.1f} s after the relay"
        else:
            assert last <= 2 * AGENT.reconnect_max_delay, f"seed {seed}: last back after {last:.1f} s"
    print(f"relay down {down_for} s: all {FLEET} agents back within {worst:.1f} s of its return")


def test_backoff_grows_only_while_attempts_fail():
    b = Backoff(1.0, 30.0, random.Random(7))
    first = [b.next_delay() for _ in range(4)]
    assert first[0] <= 1.0 and first[1] <= 2.0 and 1.0 <= first[3] <= 8.0
    b.reset()  # a registration that lasted (Agent.HEALTHY_PERIOD): the next loss starts over
    assert b.next_delay() <= 1.0


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
