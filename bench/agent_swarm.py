"""Many simulated agents in one process, speaking the real protocol: each one a TLS WebSocket
link (the project's carrier and session, ``tunnel.bridge.dial.dial_tls_link``), an ``auth``
with its own resource name, the ``registered`` answer, then an idle link kept alive by the
session's keepalive. A link that drops is dialled again as the agent's loop
(``agent.runner.Agent.run``) does it: the agent's own jittered backoff (``agent.runner.Backoff``
with the agent's ``AgentSettings.reconnect_delay``/``reconnect_max_delay``), started over after a link
that stayed up ``Agent.HEALTHY_PERIOD``; CONTROL ``draining`` moves it to the next relay at once.

    python bench/agent_swarm.py --relay-url wss://127.0.0.1:8443,wss://127.0.0.2:8443 \\
        --ca-file relay-state/ca.pem --token-file jwt --agents 2500 --first 0 --events events.jsonl

Agent ``i`` registers resource ``swarm-<i>`` on relay ``i mod len(relays)``. Every registration
and every lost link is appended to ``--events`` as a JSON line (``t``, ``event``, ``agent``),
which :mod:`bench.cluster_scale` reads. Runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import ssl
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.runner import Agent, Backoff  # noqa: E402
from agent.settings import AgentSettings  # noqa: E402
from tunnel.bridge.dial import dial_tls_link  # noqa: E402
from tunnel.carriers.base import LinkHandler  # noqa: E402
from tunnel.core.limits import Limits  # noqa: E402
from tunnel.wire.constants import ErrorCode  # noqa: E402


class Handler(LinkHandler):
    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.registered = loop.create_future()
        # A refusal after the wait gave up is not news (the failure is in the events file).
        self.registered.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.closed = loop.create_future()
        self.draining = loop.create_future()

    def control_received(self, message: dict) -> None:
        kind = message.get("type")
        if kind == "registered" and not self.registered.done():
            self.registered.set_result(message)
        elif kind == "error" and not self.registered.done():
            self.registered.set_exception(RuntimeError(f"{message.get('code')}: {message.get('message')}"))
        elif kind == "draining" and not self.draining.done():
            self.draining.set_result(None)

    def link_closed(self, code: int, reason: str) -> None:
        if not self.registered.done():
            self.registered.set_exception(RuntimeError(f"closed: {reason or code}"))
        if not self.closed.done():
            self.closed.set_result(None)


class Swarm:
    def __init__(self, args) -> None:
        self.urls = [u.strip() for u in args.relay_url.split(",") if u.strip()]
        self.token = Path(args.token_file).read_text().strip()
        self.limits = Limits.from_env()
        self.settings = AgentSettings.from_env()
        self.context = ssl.create_default_context(cafile=args.ca_file)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_3
        self.events = open(args.events, "a", buffering=1)
        self.admission = asyncio.Semaphore(args.concurrency)
        self.registered = 0
        self.links = set()

    def record(self, event: str, agent: int) -> None:
        self.events.write(json.dumps({"t": round(time.time(), 3), "event": event, "agent": agent}) + "\n")

    async def agent(self, i: int) -> None:
        backoff = Backoff(self.settings.reconnect_delay, self.settings.reconnect_max_delay)
        loop = asyncio.get_running_loop()
        relay = i % len(self.urls)
        instance = f"swarm{os.getpid():x}{i:x}"
        while True:
            served = False
            handler = None
            try:
                async with self.admission:
                    url = self.urls[relay]
                    link = await dial_tls_link(url.split("://", 1)[1], ssl_context=self.context, limits=self.limits,
                                               timeout=self.limits.handshake_timeout)
                    handler = Handler()
                    link.set_handler(handler)
                    link.send_control({"type": "auth", "token": self.token, "resources": [{"name": f"swarm-{i}"}],
                                       "agent": {"version": "swarm", "hostname": "swarm", "instance": instance,
                                                 "slot": 0}})
                    await asyncio.wait_for(asyncio.shield(handler.registered), self.limits.handshake_timeout)
                served = True
                registered_at = loop.time()
                self.registered += 1
                self.links.add(link)
                self.record("registered", i)
                await asyncio.wait({handler.closed, handler.draining}, return_when=asyncio.FIRST_COMPLETED)
                self.registered -= 1
                self.links.discard(link)
                self.record("lost", i)
                if handler.draining.done() and not handler.closed.done():
                    link.goaway(ErrorCode.NO_ERROR, "moved")
                    relay = (relay + 1) % len(self.urls)
                    continue  # at once, as the agent's slots do
            except (OSError, RuntimeError, asyncio.TimeoutError, Exception) as exc:  # noqa: BLE001
                if handler is None or not served:
                    self.record("failed:" + type(exc).__name__, i)
            if served and loop.time() - registered_at >= Agent.HEALTHY_PERIOD:
                backoff.reset()
            await asyncio.sleep(backoff.next_delay())

    async def run(self, first: int, count: int) -> None:
        tasks = [asyncio.get_running_loop().create_task(self.agent(i)) for i in range(first, first + count)]
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        for task in tasks:
            task.cancel()
        for link in list(self.links):
            link.close(ErrorCode.NO_ERROR, "swarm stopping")
        await asyncio.gather(*tasks, return_exceptions=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--relay-url", required=True, help="wss://host:port[,wss://host:port...]")
    parser.add_argument("--ca-file", required=True)
    parser.add_argument("--token-file", required=True, help="a customer-wide registration JWT")
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--first", type=int, default=0, help="number of the first agent (resource swarm-<n>)")
    parser.add_argument("--concurrency", type=int, default=64, help="handshakes in flight at once")
    parser.add_argument("--events", required=True, help="JSON lines file of registrations and lost links")
    args = parser.parse_args()
    import uvloop

    async def go() -> None:
        await Swarm(args).run(args.first, args.agents)

    uvloop.run(go())


if __name__ == "__main__":
    main()
