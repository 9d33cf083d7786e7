"""SIGKILL and SIGSTOP of the relay and of the agent while 100 echo streams trickle.

Every client stream must end (EOF or error) within the keepalive timeout plus a margin of
the moment the fault can be noticed, and the agent must serve again within seconds of the
relay's (or its own) return. Relay and agent run with keepalive 1 s / timeout 3 s.
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.faults.faultkit import FAST, KEEPALIVE_TIMEOUT, Trickle, serves, setup_agent, wait_until

STREAMS = 100
#: Scheduling slack on a loaded 2-core machine on top of the keepalive timeout.
MARGIN = 4.0
#: The agent serves again within this long of the relay's (or its own) return.
RECOVERY = 20.0


def _assert_all_ended(trickle: Trickle, ended: dict, since: float, limit: float, what: str) -> float:
    hung = [i for i in range(len(trickle.socks)) if i not in ended]
    assert not hung, f"{what}: {len(hung)} of {len(trickle.socks)} client streams still open after {limit:.1f}s"
    worst = max(t for _, t in ended.values()) - since
    assert worst <= limit, f"{what}: slowest stream ended {worst:.2f}s after the fault (limit {limit:.1f}s)"
    return worst


@pytest.mark.parametrize("fault", ["relay-kill", "relay-stop", "agent-kill", "agent-stop"])
def test_streams_end_and_service_returns(relay, agents, service_factory, transport, fault):
    service = service_factory("echo")
    customer, _, agent, addr = setup_agent(relay, agents, service, transport)
    trickle = Trickle(addr, STREAMS)
    try:
        target = relay.proc if fault.startswith("relay") else agent
        if fault.endswith("kill"):
            t0 = time.monotonic()
            target.signal(signal.SIGKILL)
            target.proc.wait(10)
            if fault == "relay-kill":
                # The kernel closes the endpoint sockets of a dead relay at once.
                ended = trickle.run_until_all_ended(MARGIN)
                _assert_all_ended(trickle, ended, t0, MARGIN, fault)
                relay.start()
                back = time.monotonic()
            else:
                # The relay sees the agent's link end (TCP close, or QUIC silence).
                ended = trickle.run_until_all_ended(KEEPALIVE_TIMEOUT + MARGIN)
                worst = _assert_all_ended(trickle, ended, t0, KEEPALIVE_TIMEOUT + MARGIN, fault)
                print(f"{fault}/{transport}: all {STREAMS} streams ended within {worst:.2f}s")
                wait_until(lambda: relay.resource(customer, "db")["status"] == "UNAVAILABLE", 10, "agent dropped")
                agent = agents.start(f"{transport}://127.0.0.1:{relay.port}", relay.jwt("--customer-id", customer),
                                     "db", service.port, ca_file=relay.ca_file, **FAST)
                back = time.monotonic()
        else:
            target.signal(signal.SIGSTOP)
            t0 = time.monotonic()
            if fault == "agent-stop":
                # The relay notices the silent agent by keepalive and resets its streams.
                ended = trickle.run_until_all_ended(KEEPALIVE_TIMEOUT + MARGIN)
                worst = _assert_all_ended(trickle, ended, t0, KEEPALIVE_TIMEOUT + MARGIN, fault)
                print(f"{fault}/{transport}: all {STREAMS} streams ended within {worst:.2f}s")
                wait_until(lambda: relay.resource(customer, "db")["status"] == "UNAVAILABLE", 10, "agent dropped")
                target.signal(signal.SIGCONT)
                back = time.monotonic()
            else:
                # A frozen relay cannot close its endpoint sockets; the agent notices the
                # silence within the keepalive timeout (it logs and reconnects) ...
                wait_until(lambda: "unreachable" in agent.log(), KEEPALIVE_TIMEOUT + MARGIN,
                           "the agent to notice the frozen relay")
                noticed = time.monotonic() - t0
                print(f"{fault}/{transport}: agent noticed the frozen relay after {noticed:.2f}s")
                # ... and once thawed the relay finds the link dead and ends every stream.
                target.signal(signal.SIGCONT)
                thawed = time.monotonic()
                ended = trickle.run_until_all_ended(KEEPALIVE_TIMEOUT + MARGIN)
                _assert_all_ended(trickle, ended, thawed, KEEPALIVE_TIMEOUT + MARGIN, fault + " (after SIGCONT)")
                back = thawed
        assert not [i for i, (how, _) in ended.items() if how not in ("eof", "error")]
        wait_until(lambda: serves(addr), RECOVERY, "the agent to serve again")
        print(f"{fault}/{transport}: serving again {time.monotonic() - back:.2f}s after the return")
        assert agent.alive()
    finally:
        trickle.close()
