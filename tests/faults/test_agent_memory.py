"""A hostile relay cannot grow a real agent process past the bound docs/LIMITS.md states
("Agent memory"): idle RSS + the receive bound (2 x SESSION_WINDOW + MAX_STREAM_WINDOW) +
AGENT_STREAM_COST per open stream + working buffers. The relay side is the project's own WSS carrier and session (tests/faults/
hostile_relay.py), writing as fast as the agent's credit allows.

Each test takes 15-30 s on a loaded 2-core machine (thousands of streams and sockets)."""

from __future__ import annotations

import asyncio

from tests.faults.faultkit import raise_nofile, rss_kib
from tests.faults.hostile_relay import DiscardService, HostileRelay, StalledService, UnreachableService
from tunnel.core.limits import DEFAULT_LIMITS

KiB = 1024
#: docs/LIMITS.md, "Agent memory": user-space cost of one open stream with its TCP connection,
#: and the working buffers (TLS records, the carrier's read buffers, allocator slack).
AGENT_STREAM_COST = 8 * KiB
AGENT_WORKING_BUFFERS = 16 * 1024 * KiB


def peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


def bound_kib(streams: int) -> int:
    return (DEFAULT_LIMITS.receive_bound + streams * AGENT_STREAM_COST + AGENT_WORKING_BUFFERS) // KiB


async def _wait(condition, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(0.05)


def test_thousands_of_streams_to_a_service_that_never_reads(tmp_path, agents):
    """4,000 streams with 1 MiB each to a service that accepts and never reads: the agent
    keeps at most what the kernel did not take, and that within its session window."""
    raise_nofile(20000)
    streams, size = 4000, 1024 * 1024
    service = StalledService()

    async def main():
        async with HostileRelay(tmp_path) as relay:
            agent = agents.start(relay.url, "x.y.z", "db", service.port, ca_file=relay.ca_file, LOG_LEVEL="INFO")
            link = await relay.wait_agent()
            idle = rss_kib(agent.pid)
            data = b"\x5a" * size
            for i in range(streams):
                relay.open("db").write(data)
                if i % 256 == 0:
                    await asyncio.sleep(0)  # let the link flush between batches
            await _wait(lambda: len(service.conns) >= streams, 60, "every dial to complete")
            await _wait(lambda: relay.starved, 60, "the agent to stop granting credit")
            peak = peak_rss_kib(agent.pid)
            moved = link.bytes_sent
            return idle, peak, moved

    try:
        idle, peak, moved = asyncio.run(main())
    finally:
        service.close()
    print(f"agent RSS idle {idle} KiB, peak {peak} KiB (+{peak - idle}); relay sent {moved >> 20} MiB; "
          f"bound +{bound_kib(streams)} KiB")
    assert peak - idle <= bound_kib(streams)


def test_data_for_streams_still_dialling_does_not_pin_read_buffers(tmp_path, agents):
    """1,500 streams whose dial never completes get one byte each, every byte in a different
    read buffer of the agent's carrier (a bulk stream to a fast service fills the rest). The
    agent may hold those bytes, not the 256 KiB buffers around them."""
    raise_nofile(20000)
    stuck_streams = 1500
    discard = DiscardService()
    unreachable = UnreachableService()
    config = tmp_path / "agent.toml"
    config.write_text(f'[[resources]]\nname = "stuck"\nhost = "127.0.0.1"\nport = {unreachable.port}\n')

    async def main():
        async with HostileRelay(tmp_path) as relay:
            agent = agents.start(relay.url, "x.y.z", "drain", discard.port, ca_file=relay.ca_file, LOG_LEVEL="INFO",
                                 AGENT_CONFIG_FILE=str(config), TUNNEL_CONNECT_TIMEOUT="120")
            link = await relay.wait_agent()
            idle = rss_kib(agent.pid)
            bulk = relay.open("drain")
            filler = b"\xa5" * (320 * KiB)  # more than one read buffer between two stuck bytes
            expected = 0
            for _ in range(stuck_streams):
                relay.open("stuck").write(b"!")
                bulk.write(filler)
                expected += len(filler)
                # One stuck byte per flight of bulk data: on to the next once this one left.
                deadline = asyncio.get_running_loop().time() + 30
                while link.session.send_buffered_total:
                    assert asyncio.get_running_loop().time() < deadline, "the bulk data did not leave"
                    await asyncio.sleep(0)
            await _wait(lambda: discard.received >= expected, 60, "the bulk data to arrive")
            return idle, peak_rss_kib(agent.pid)

    try:
        idle, peak = asyncio.run(main())
    finally:
        discard.close()
        unreachable.close()
    print(f"agent RSS idle {idle} KiB, peak {peak} KiB (+{peak - idle}); bound +{bound_kib(stuck_streams + 1)} KiB")
    assert peak - idle <= bound_kib(stuck_streams + 1)
