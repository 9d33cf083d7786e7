"""Broken paths and stuck streams: a blackholed relay port, a half-close never answered,
and 10,000 stream open/close cycles (memory and descriptors back near baseline)."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.faults.faultkit import (KEEPALIVE_TIMEOUT, echo_once, fd_count, rss_kib, serves, setup_agent,
                                   wait_until)
from tests.helpers.processes import connect

MARGIN = 4.0


def _iptables(*args: str) -> None:
    subprocess.run(["iptables", "-w", "5", *args], check=True, capture_output=True, timeout=30)


def _blackhole_rules(port: int) -> list[list[str]]:
    # Loopback only, this relay's port only, both directions, TCP and UDP.
    return [["INPUT", "-i", "lo", "-p", proto, f"--{end}", str(port), "-j", "DROP"]
            for proto in ("tcp", "udp") for end in ("dport", "sport")]


def _have_iptables() -> bool:
    try:
        return subprocess.run(["iptables", "-w", "5", "-L", "INPUT", "-n"], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(os.geteuid() != 0 or not _have_iptables(), reason="needs root and iptables")
def test_blackholed_path_is_noticed_by_both_sides(relay, agents, service_factory, transport):
    service = service_factory("echo")
    customer, _, agent, addr = setup_agent(relay, agents, service, transport)
    rules = _blackhole_rules(relay.port)
    added = []
    try:
        for rule in rules:
            _iptables("-I", *rule)
            added.append(rule)
        t0 = time.monotonic()
        wait_until(lambda: "unreachable" in agent.log(), KEEPALIVE_TIMEOUT + MARGIN,
                   "the agent to notice the blackholed path")
        agent_noticed = time.monotonic() - t0
        # The admin API has its own port: it still answers while the agent port is dropped.
        wait_until(lambda: relay.resource(customer, "db")["status"] == "UNAVAILABLE", KEEPALIVE_TIMEOUT + MARGIN,
                   "the relay to drop the silent agent")
        relay_noticed = time.monotonic() - t0
        print(f"blackhole/{transport}: agent noticed after {agent_noticed:.2f}s, relay dropped it after "
              f"{relay_noticed:.2f}s")
    finally:
        for rule in added:
            _iptables("-D", *rule)
    t1 = time.monotonic()
    wait_until(lambda: serves(addr), 40, "the agent to serve again once the path is back")
    print(f"blackhole/{transport}: serving again {time.monotonic() - t1:.2f}s after the path came back")
    assert agent.alive() and relay.proc.alive()


class HoldService:
    """Reads until EOF, then holds the connection open without answering or closing."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.eof_seen = threading.Event()
        self.closed_by_peer = threading.Event()
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        self.conns.append(conn)
        try:
            while conn.recv(65536):
                pass
            self.eof_seen.set()
            # Our direction stays open and silent; the tunnel must give up on it.
            while conn.recv(65536):
                pass
        except OSError:
            pass
        self.closed_by_peer.set()

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


def test_half_close_never_answered_is_reset(tmp_path, agents):
    from tests.helpers.processes import Relay

    env = {"TUNNEL_HALF_CLOSE_TIMEOUT": "2"}
    relay = Relay(tmp_path)
    relay.start(TUNNEL_KEEPALIVE_INTERVAL="1", TUNNEL_KEEPALIVE_TIMEOUT="3", **env)
    hold = HoldService()
    try:
        customer, _, agent, addr = setup_agent(relay, agents, hold, "wss", **env)
        base = {"relay": fd_count(relay.proc.pid), "agent": fd_count(agent.pid)}
        with connect(addr) as s:
            s.sendall(b"request")
            s.shutdown(socket.SHUT_WR)
            assert hold.eof_seen.wait(20), "the service never saw the client's half-close"
            t0 = time.monotonic()
            s.settimeout(2 + MARGIN + 5)
            try:
                data = s.recv(1)
                how = "eof" if data == b"" else f"data {data!r}"
            except ConnectionResetError:
                how = "reset"
            took = time.monotonic() - t0
        print(f"half-close: client stream ended ({how}) {took:.2f}s after the half-close reached the service")
        assert how in ("reset", "eof"), how
        assert took <= 2 + MARGIN
        assert hold.closed_by_peer.wait(10), "the agent kept the service connection open"
        wait_until(lambda: fd_count(relay.proc.pid) <= base["relay"] and fd_count(agent.pid) <= base["agent"],
                   10, "relay and agent descriptors back to baseline")
    finally:
        hold.close()
        relay.stop()


#: Cycles, and what the relay and agent may keep afterwards: allocator high-water marks and
#: caches, not per-stream state (a leak of ~1 KiB per stream would show as 10 MiB).
CYCLES = 10_000
RSS_MARGIN_KIB = 8 * 1024
FD_MARGIN = 4


def test_ten_thousand_stream_cycles_leave_no_residue(relay, agents, service_factory, transport):
    service = service_factory("echo")
    _, _, agent, addr = setup_agent(relay, agents, service, transport)
    pids = {"relay": relay.proc.pid, "agent": agent.pid}

    def cycle(i: int) -> bool:
        payload = i.to_bytes(4, "big") * 8
        return echo_once(addr, payload) == payload

    with ThreadPoolExecutor(16) as pool:
        assert all(pool.map(cycle, range(500)))  # warm-up: caches, allocator arenas
    base_fd = {k: fd_count(p) for k, p in pids.items()}
    base_rss = {k: rss_kib(p) for k, p in pids.items()}
    t0 = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(cycle, range(CYCLES)))
    took = time.monotonic() - t0
    assert all(results), f"{results.count(False)} of {CYCLES} cycles were not exact"
    wait_until(lambda: all(fd_count(p) <= base_fd[k] + FD_MARGIN for k, p in pids.items()), 15,
               "descriptors back to baseline")
    after_fd = {k: fd_count(p) for k, p in pids.items()}
    after_rss = {k: rss_kib(p) for k, p in pids.items()}
    print(f"churn/{transport}: {CYCLES} cycles in {took:.1f}s; fds {base_fd} -> {after_fd}; "
          f"RSS KiB {base_rss} -> {after_rss}")
    for k in pids:
        assert after_rss[k] - base_rss[k] <= RSS_MARGIN_KIB, f"{k} RSS grew {after_rss[k] - base_rss[k]} KiB"
    assert serves(addr)
