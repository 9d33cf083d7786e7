"""One customer cannot spend the relay's open files for everyone (docs/LIMITS.md, "Quotas"):
a real relay started with a low limit (soft 256, hard 1,024) raises its soft limit to the
hard one, keeps a reserve, and gives one customer at most its share. An attacker holding 400
connections to its endpoint gets the rest reset, while the admin API answers, another
customer's agent registers and moves bytes, and the attacker's next agent link is refused
with a clear error; with a second customer at its share too, the relay's budget is spent by
the two, and the others still get in, on the reserve. About 15 s."""

from __future__ import annotations

import asyncio
import resource
import socket

from tests.faults.faultkit import FAST, echo_once, raise_nofile, register, setup_agent
from tests.helpers.processes import Relay, connect, wait_until

SOFT, HARD = 256, 1024
ATTACK = 400


def _low_nofile() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (SOFT, HARD))


def _open_files_limit(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError("no open-file limit")


def _attempt(addr) -> socket.socket | None:
    """A connection to ``addr``, or None when the relay's reset beat ``connect()`` itself (it
    accepts and resets at once: on an idle loopback the RST can arrive before connect returns)."""
    try:
        s = connect(addr, timeout=10)
    except ConnectionResetError:
        return None
    s.settimeout(10)
    return s


def _serves(s: socket.socket) -> bool:
    try:
        s.sendall(b"?")
        return s.recv(1) == b"?"
    except OSError:
        return False


def test_one_customer_at_its_descriptor_share_harms_nobody_else(tmp_path, agents, service_factory):
    raise_nofile()
    relay = Relay(tmp_path)
    relay.preexec_fn = _low_nofile
    relay.start(**FAST)
    held: list[socket.socket] = []
    try:
        service = service_factory("echo")
        attacker, attacker_token, _, attacker_addr = setup_agent(relay, agents, service, customer_name="attacker")

        held += [s for s in (_attempt(attacker_addr) for _ in range(ATTACK)) if s is not None]
        served = sum(_serves(s) for s in held)
        print(f"{served} of {ATTACK} connections to the attacker's endpoint served, the rest reset")
        assert 0 < served < ATTACK

        # Everyone else carries on: the admin API, a new customer, its agent and its bytes.
        victim, _, _, victim_addr = setup_agent(relay, agents, service, customer_name="victim")
        assert echo_once(victim_addr, b"victim") == b"victim"
        _, rec = asyncio.run(register(relay, attacker_token, ["db"]))
        error = rec.first("error")
        assert error and error["code"] == "quota_exceeded" and "relay file descriptors" in error["message"], rec.messages

        # A second customer takes its share too: the budget is spent by the two, yet the
        # others (below their fair part) go on into the reserve: the victim's bytes, a
        # newcomer's agent, the admin API.
        greedy, _, _, greedy_addr = setup_agent(relay, agents, service, customer_name="greedy")
        first = len(held)
        held += [s for s in (_attempt(greedy_addr) for _ in range(ATTACK)) if s is not None]
        assert 0 < sum(_serves(s) for s in held[first:]) < ATTACK
        assert echo_once(victim_addr, b"victim again") == b"victim again"
        setup_agent(relay, agents, service, customer_name="newcomer")

        # The attacker's share comes back when it lets go.
        for s in held:
            s.close()
        held.clear()
        wait_until(lambda: echo_once(attacker_addr, b"again") == b"again", 20, "the attacker's endpoint to serve")
        assert _open_files_limit(relay.proc.pid) == (HARD, HARD)
        log = relay.proc.log()
        assert f"limit {HARD} (raised from {SOFT})" in log
        for customer in (attacker, greedy):  # each logged once per interval
            assert log.count(f"resetting new connections to the endpoints of customer {customer}") == 1
        assert "Traceback" not in log and "Too many open files" not in log
    finally:
        for s in held:
            s.close()
        relay.stop()
