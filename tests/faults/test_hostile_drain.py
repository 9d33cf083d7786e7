"""A hostile relay that answers every ``auth`` with ``registered`` and then ``draining`` (naming
a relay nobody knows), and never closes a link, cannot spin the agent (issue 20, item 3: about
250 registrations/s, 1,854 descriptors and 155 MB in 10 s, each abandoned link waiting up to
300 s). Moves back off while they keep coming, links being left are capped and aborted after a
short drain: over 10 s the agent's registrations, descriptors, memory and log lines stay
bounded. The bounds are generous counts, not timings. About 15 s."""

from __future__ import annotations

import asyncio

from tests.faults.faultkit import fd_count, rss_kib
from tests.faults.hostile_relay import HostileRelay

WINDOW = 10.0


def test_a_relay_that_always_drains_cannot_spin_the_agent(tmp_path, agents, service_factory):
    service = service_factory("echo")

    async def main():
        async with HostileRelay(tmp_path, drain_every_auth=True) as relay:
            agent = agents.start(relay.url, "x.y.z", "db", service.port, ca_file=relay.ca_file, LOG_LEVEL="INFO")
            await relay.wait_agent()
            loop = asyncio.get_running_loop()
            start_fds, start_rss, start_auths = fd_count(agent.pid), rss_kib(agent.pid), relay.answered
            start_lines = agent.log().count("\n")
            most_fds = start_fds
            end = loop.time() + WINDOW
            while loop.time() < end:  # sampled through the window
                most_fds = max(most_fds, fd_count(agent.pid))
                await asyncio.sleep(0.2)
            return (agent, relay.answered - start_auths, start_fds, most_fds, rss_kib(agent.pid) - start_rss,
                    agent.log().count("\n") - start_lines)

    agent, auths, start_fds, most_fds, grown_kib, lines = asyncio.run(main())
    print(f"in {WINDOW:g} s: {auths} registrations, descriptors {start_fds} -> at most {most_fds}, "
          f"RSS +{grown_kib} KiB, {lines} log lines")
    assert agent.alive()
    assert auths <= 30, f"{auths} registrations in {WINDOW:g} s"
    assert most_fds <= start_fds + 20, (start_fds, most_fds)
    assert grown_kib <= 20 * 1024
    assert lines <= 200, agent.log()[-3000:]
