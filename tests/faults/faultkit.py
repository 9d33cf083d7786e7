"""Helpers of the fault, hostile-input and load tests (tests/faults).

They build on tests/helpers/processes.py. Every wait is on a condition with a
deadline; relay and agent run with a short keepalive (``FAST``) so faults are noticed in
seconds."""

from __future__ import annotations

import os
import resource
import selectors
import socket
import time

from tests.helpers.processes import Agents, PrivateService, Relay, connect, recv_all, wait_until

#: Limits for relay and agent in fault tests: keepalive 1 s, dead after 3 s of silence.
KEEPALIVE_TIMEOUT = 3.0
FAST = {"TUNNEL_KEEPALIVE_INTERVAL": "1", "TUNNEL_KEEPALIVE_TIMEOUT": str(int(KEEPALIVE_TIMEOUT))}


def raise_nofile(want: int = 16384) -> None:
    """Raise this process's open-file limit (children inherit it); the hard limit too when
    allowed (root)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, want))
            hard = want
        except (ValueError, OSError):
            pass
    target = min(want, hard) if hard != resource.RLIM_INFINITY else want
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def echo_once(addr, payload: bytes = b"ping", timeout: float = 10.0) -> bytes:
    with connect(addr, timeout=timeout) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        return recv_all(s)


def serves(addr, payload: bytes = b"hello") -> bool:
    try:
        return echo_once(addr, payload, timeout=5) == payload
    except OSError:
        return False


class Trickle:
    """``n`` echo streams kept open, each sending a byte now and then and reading the echo.

    ``run_until_all_ended`` drives them from one thread with a selector and returns, per
    stream, how it ended ("eof" or "error") and when (monotonic seconds)."""

    def __init__(self, addr, n: int) -> None:
        self.socks: list[socket.socket] = []
        for i in range(n):
            s = connect(addr, timeout=10)
            self.socks.append(s)
        # Prove every stream is live end to end before the fault.
        for i, s in enumerate(self.socks):
            s.sendall(bytes([i % 256]))
        for i, s in enumerate(self.socks):
            assert s.recv(1) == bytes([i % 256]), f"stream {i} did not echo before the fault"
        for s in self.socks:
            s.setblocking(False)
        self.ended: dict[int, tuple[str, float]] = {}

    def run_until_all_ended(self, timeout: float, trickle_every: float = 0.25) -> dict[int, tuple[str, float]]:
        sel = selectors.DefaultSelector()
        for i, s in enumerate(self.socks):
            sel.register(s, selectors.EVENT_READ, i)
        deadline = time.monotonic() + timeout
        next_trickle = time.monotonic()
        try:
            while len(self.ended) < len(self.socks) and time.monotonic() < deadline:
                now = time.monotonic()
                if now >= next_trickle:
                    next_trickle = now + trickle_every
                    for i, s in enumerate(self.socks):
                        if i in self.ended:
                            continue
                        try:
                            s.send(b"t")
                        except BlockingIOError:
                            pass
                        except OSError:
                            self._end(sel, i, "error")
                for key, _ in sel.select(timeout=0.05):
                    i = key.data
                    if i in self.ended:
                        continue
                    try:
                        data = self.socks[i].recv(65536)
                    except BlockingIOError:
                        continue
                    except OSError:
                        self._end(sel, i, "error")
                        continue
                    if not data:
                        self._end(sel, i, "eof")
        finally:
            sel.close()
        return self.ended

    def _end(self, sel, i: int, how: str) -> None:
        self.ended[i] = (how, time.monotonic())
        try:
            sel.unregister(self.socks[i])
        except (KeyError, ValueError):
            pass

    def close(self) -> None:
        for s in self.socks:
            s.close()


def setup_agent(relay, agents, service, transport="wss", name="db", customer=None, customer_name="acme", **env):
    """A customer, a JWT, one agent for ``name``; returns (customer, token, agent proc, endpoint addr)."""
    customer = customer or relay.create_customer(customer_name)
    token = relay.jwt("--customer-id", customer)
    env = {**FAST, **env}
    agent = agents.start(f"{transport}://127.0.0.1:{relay.port}", token, name, service.port,
                         ca_file=relay.ca_file, **env)
    relay.wait_available(customer, name)
    return customer, token, agent, relay.endpoint(customer, name)


# --- a hand-driven agent: the project's own carriers, messages chosen by the test ----------


class Recorder:
    """LinkHandler that records CONTROL messages and the link's end."""

    def __init__(self) -> None:
        self.messages: list[dict] = []
        self.closed: tuple | None = None

    def stream_opened(self, stream):
        from tunnel.wire.constants import ErrorCode

        stream.reset(ErrorCode.REFUSED)
        return None

    def control_received(self, message: dict) -> None:
        self.messages.append(message)

    def link_closed(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def first(self, kind: str) -> dict | None:
        return next((m for m in self.messages if m.get("type") == kind), None)


async def hand_link(relay, transport: str = "wss"):
    """A ready link to ``relay`` (HELLOs exchanged) with a :class:`Recorder` as its handler."""
    import ssl

    from tunnel.core.limits import Limits

    if transport == "quic":
        from tunnel.carriers.quic import connect_quic

        link = await connect_quic("127.0.0.1", relay.port, ca_file=relay.ca_file, server_name="127.0.0.1",
                                  limits=Limits(), timeout=10)
    else:
        from tunnel.carriers.wss import connect_wss

        link = await connect_wss(f"wss://127.0.0.1:{relay.port}", ssl_context=ssl.create_default_context(
            cafile=relay.ca_file), limits=Limits(), timeout=10)
    recorder = Recorder()
    link.set_handler(recorder)
    return link, recorder


async def until(condition, timeout: float = 10.0, what: str = "condition") -> None:
    """Async twin of wait_until: poll ``condition`` on the running loop until a deadline."""
    import asyncio

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def auth_message(token: str, names, **agent) -> dict:
    return {"type": "auth", "token": token, "agent": {"version": "0.1.0", "hostname": "test", **agent},
            "resources": [{"name": n} for n in names]}


async def register(relay, token: str, names, transport: str = "wss", **agent):
    """Authenticate a hand-driven agent; return (link, recorder) once the relay answered
    (``registered``, or ``error`` and the link's end)."""
    link, recorder = await hand_link(relay, transport)
    link.send_control(auth_message(token, names, **agent))
    await until(lambda: recorder.first("registered") or recorder.closed, 15, "the relay's answer")
    return link, recorder
