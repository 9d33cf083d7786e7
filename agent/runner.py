"""The agent's life: dial the relay, register, serve streams, and when the link drops,
reconnect with jittered exponential backoff, forever.

Each stream the relay opens names a resource; the agent dials only the ``host:port``
configured for that name and refuses any other (it never dials an address the relay sends).

When the relay deregisters one resource (CONTROL ``deregistered``: its token was revoked or it
was deleted), the agent stops serving that resource for the rest of its life (its streams
end, later registrations leave it out) and goes on with the others; with none left it exits
with code 3.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import socket

from tunnel import __version__
from tunnel.bridge.tcp import LinkBuffers, TcpBridge, dial_bridge, stream_handler
from tunnel.carriers.base import Link, LinkHandler, LinkStream
from tunnel.core.limits import Limits
from tunnel.wire.constants import ErrorCode, describe_code
from tunnel.wire.errors import AuthError, LinkError

from .config import AgentConfig

log = logging.getLogger("agent")

#: Error codes from the relay after which retrying with the same token is futile.
FATAL_CODES = {"unauthorized", "revoked", "bad_request", "deleted"}
#: What the relay accepts as ``agent.hostname`` (docs/LIMITS.md); other characters become '-'.
_HOSTNAME_OUTSIDE = re.compile(r"[^A-Za-z0-9._-]")


class Backoff:
    """Jittered exponential backoff: a random delay in [ceiling/10, ceiling], the ceiling
    doubling from ``base`` per attempt up to ``cap``.

    After an *established* link drops (:meth:`link_lost`) the ceiling starts at ``spread``
    instead: when a relay restarts every agent loses its link in the same instant, and
    delays drawn from [0.05, 0.5] s would bring most of them back in the same second. Drawn
    over ``spread`` seconds and growing from there, no second sees more than about a sixth of
    a fleet (tests/faults/test_reconnect.py measures it for 500 agents).
    """

    def __init__(self, base: float = 0.5, cap: float = 30.0, rng: random.Random | None = None,
                 spread: float = 10.0) -> None:
        self.base = base
        self.cap = cap
        self.spread = spread
        self.attempt = 0
        self._start = base
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        ceiling = min(self.cap, self._start * (2 ** min(self.attempt, 32)))
        self.attempt += 1
        return self._rng.uniform(ceiling / 10, ceiling)

    def reset(self) -> None:
        self.attempt = 0
        self._start = self.base

    def link_lost(self) -> None:
        """An established link dropped: spread the reconnects from here (see the class doc)."""
        if self._start < self.spread:
            self._start = self.spread
            self.attempt = 0


class AgentLinkHandler(LinkHandler):
    """The agent's side of one link: registration answer, streams, closing."""

    def __init__(self, agent: "Agent", link: Link) -> None:
        self.agent = agent
        self.link = link
        loop = asyncio.get_running_loop()
        self.registered: asyncio.Future = loop.create_future()
        self.closed: asyncio.Future = loop.create_future()
        #: Set when the relay drains and asks this link to move elsewhere (agent.links).
        self.moving: asyncio.Future = loop.create_future()
        self.error: AuthError | None = None
        #: What this link's bridges hold in user space, bounded by the window we announced.
        self.buffers = LinkBuffers(agent.limits.session_window)
        #: Resource name -> the bridges of its streams on this link.
        self.bridges: dict[str, set[TcpBridge]] = {}

    def stream_opened(self, stream: LinkStream):
        name = stream.metadata.decode("utf-8", "replace")
        target = self.agent.serving(name)
        if target is None:
            log.warning("refusing a stream for resource %r: not served by this agent", name[:128])
            stream.reset(ErrorCode.REFUSED)
            return None
        bridge = TcpBridge(stream, self.buffers)
        bridges = self.bridges.setdefault(name, set())
        bridges.add(bridge)
        bridge.on_done = lambda: bridges.discard(bridge)
        task = asyncio.get_running_loop().create_task(
            dial_bridge(stream, bridge, target.host, target.port, self.agent.limits.connect_timeout))
        self.agent.tasks.add(task)
        task.add_done_callback(self.agent.tasks.discard)
        if self.agent.metrics is not None:
            self.agent.metrics.stream_dialing(name, task)
        return stream_handler(bridge)

    def control_received(self, message: dict) -> None:
        kind = message.get("type")
        if kind == "registered" and not self.registered.done():
            # Known at once: a ``relays`` message right behind this one must see this slot's
            # relay as taken, before the registering task resumes.
            relay_id = message.get("relay_id")
            self.agent.relay_id = relay_id if isinstance(relay_id, str) else None
            self.registered.set_result(message)
        elif kind == "deregistered":
            self._deregistered(message)
        elif kind in ("relays", "draining") and self.agent.links is not None:
            self.agent.links.control(self.agent, self, message)
        elif kind == "error":
            code = str(message.get("code", "error"))
            text = str(message.get("message", ""))[:512]
            self.error = AuthError(f"relay refused this agent: {text} ({code})", code=code, fatal=code in FATAL_CODES)
            if not self.registered.done():
                self.registered.set_exception(self.error)

    def _deregistered(self, message: dict) -> None:
        """The relay stopped routing one resource to us: end it here, keep the others."""
        resource = message.get("resource") if isinstance(message.get("resource"), dict) else {}
        name = resource.get("name")
        if not isinstance(name, str) or self.agent.serving(name) is None:
            return
        code = str(message.get("code", "deregistered"))[:64]
        text = str(message.get("message", ""))[:512]
        agent = self.agent
        agent.dropped.add(name)
        for bridge in list(self.bridges.pop(name, ())):
            bridge.fail(ErrorCode.UNAUTHORIZED)
        left = [t.name for t in agent.config.targets if t.name not in agent.dropped]
        if left:
            log.warning("relay deregistered resource %s (%s): %s (%s); no longer serving it, still serving %s",
                        name, resource.get("id"), text, code, ", ".join(left))
            return
        self.error = AuthError(f"relay deregistered every resource of this agent, the last {name}: {text} ({code})",
                               code=code, fatal=True)
        self.link.close(ErrorCode.UNAUTHORIZED, "no resource left to serve")

    def link_closed(self, code: int, reason: str) -> None:
        if code == ErrorCode.UNAUTHORIZED and self.error is None:
            # The refusal itself, when the carrier closed before the error message arrived.
            self.error = AuthError(f"relay refused this agent: {reason[:512] or 'unauthorized'} (unauthorized)",
                                   code="unauthorized", fatal=True)
        if not self.registered.done():
            self.registered.set_exception(self.error or LinkError(f"link closed during registration: {reason or code}"))
        if not self.closed.done():
            self.closed.set_result((code, reason))


class Agent:
    """Runs until a fatal error (then ``run`` returns an exit code) or cancellation."""

    #: A link that stayed up this long resets the backoff.
    HEALTHY_PERIOD = 30.0

    def __init__(self, config: AgentConfig, limits: Limits | None = None, dialer=None, *, slot: int = 0,
                 links=None) -> None:
        self.config = config
        self.limits = limits or Limits.from_env()
        #: Which of the agent's links this life keeps, and the :class:`agent.links.AgentLinks`
        #: choosing its relay (None: one link to RELAY_URL).
        self.slot = slot
        self.links = links
        #: The relay id the last registration answered with.
        self.relay_id: str | None = None
        if dialer is None:
            from tunnel.bridge.dial import Dialer

            dialer = Dialer(config.relay_url, ca_file=config.ca_file, limits=self.limits)
        self.dialer = dialer
        # As secrets.token_hex(6), without hashlib and hmac; one per agent process (all slots).
        self.instance = links.instance if links is not None else os.urandom(6).hex()
        self.tasks: set[asyncio.Task] = set()
        self.backoff = Backoff()
        #: The link being served (the newest one, under auto:// after a move to QUIC).
        self.link: Link | None = None
        #: Names the relay deregistered: not served, not registered again, until a restart.
        self.dropped: set[str] = links.dropped if links is not None else set()
        #: :class:`agent.metrics.AgentMetrics` when METRICS_LISTEN is set, else None.
        self.metrics = None

    def serving(self, name: str):
        """The target of resource ``name`` if this agent serves it, else None."""
        return None if name in self.dropped else self.config.target(name)

    def _auth_message(self) -> dict:
        hostname = _HOSTNAME_OUTSIDE.sub("-", socket.gethostname())[:253] or "unknown"
        return {
            "type": "auth",
            "token": self.config.token,
            "agent": {"version": __version__, "hostname": hostname, "instance": self.instance, "slot": self.slot},
            "resources": [{"name": t.name} for t in self.config.targets if t.name not in self.dropped],
        }

    async def register(self, link: Link) -> AgentLinkHandler:
        handler = AgentLinkHandler(self, link)
        link.set_handler(handler)
        link.send_control(self._auth_message())
        try:
            answer = await asyncio.wait_for(asyncio.shield(handler.registered), self.limits.handshake_timeout)
        except asyncio.TimeoutError:
            link.close(ErrorCode.TIMEOUT, "registration timed out")
            raise LinkError("the relay did not answer the registration in time") from None
        except BaseException:
            link.close(ErrorCode.UNAUTHORIZED, "registration refused")
            raise
        for res in answer.get("resources", []):
            log.info("serving resource %s (%s) via %s; integration endpoint %s", res.get("name"), res.get("id"),
                     link.carrier, res.get("endpoint"))
        if self.metrics is not None:
            self.metrics.registered(link)
        if self.links is not None:
            self.links.registered(self, link)
        return handler

    async def run(self) -> int:
        try:
            return await self._run()
        except asyncio.CancelledError:
            # Stopping (SIGTERM): say goodbye so the relay fails over at once instead of
            # waiting for its keepalive timeout.
            if self.link is not None and not self.link.is_closing:
                self.link.close(ErrorCode.NO_ERROR, "agent stopping")
                try:
                    await asyncio.wait_for(self.link.wait_closed(), 2.0)
                except (asyncio.TimeoutError, Exception):
                    pass
            raise

    async def _run(self) -> int:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            served = False
            if self.metrics is not None:
                self.metrics.connecting()
            try:
                if self.links is not None:
                    self.dialer = await self.links.dialer(self)
                link = self.link = await self.dialer.dial()
                log.info("connected to %s over %s", self.dialer.url.split("://", 1)[-1], link.carrier)
                handler = await self.register(link)
                served = True
                await self.serve(link, handler)
            except LinkMoved:
                continue  # the relay drains: link elsewhere at once (agent.links)
            except AuthError as exc:
                if exc.fatal:
                    log.error("%s; not retrying: fix the registration token and restart the agent", exc)
                    return 3
                log.warning("%s", exc)
            except (LinkError, OSError, asyncio.TimeoutError, ConnectionError) as exc:
                log.warning("relay %s unreachable: %s", self.dialer.url, _describe(exc))
            if loop.time() - started >= self.HEALTHY_PERIOD:
                self.backoff.reset()
            if served:
                self.backoff.link_lost()
            delay = self.backoff.next_delay()
            log.info("reconnecting in %.1f s", delay)
            if self.metrics is not None:
                self.metrics.waiting()
            await asyncio.sleep(delay)

    async def serve(self, link: Link, handler: AgentLinkHandler) -> None:
        """Serve ``link`` until it closes; under auto://, move to QUIC when it becomes reachable."""
        loop = asyncio.get_running_loop()
        while True:
            if self.dialer.may_move_to_quic:
                done, _ = await asyncio.wait({handler.closed, handler.moving}, timeout=min(self.dialer.reprobe_interval, 5.0),
                                             return_when=asyncio.FIRST_COMPLETED)
                if handler.moving.done() and not handler.closed.done():
                    raise LinkMoved()
                if not done and self.dialer.should_probe_quic(loop.time()):
                    moved = await self._try_quic(link)
                    if moved is not None:
                        link, handler = moved
                        self.link = link
                    continue
            await asyncio.wait({handler.closed, handler.moving}, return_when=asyncio.FIRST_COMPLETED)
            if not handler.closed.done():
                raise LinkMoved()
            break
        code, reason = handler.closed.result()
        if handler.error is not None:
            raise handler.error
        raise LinkError(f"link closed: {describe_code(code, reason)}")

    async def _try_quic(self, old: Link):
        new = await self.dialer.probe_quic()
        if new is None:
            log.debug("QUIC still unreachable (%s); staying on WSS", self.dialer.last_quic_error)
            return None
        try:
            handler = await self.register(new)
        except (AuthError, LinkError, OSError, asyncio.TimeoutError) as exc:
            log.info("QUIC reachable again but registration over it failed: %s", _describe(exc))
            new.close()
            return None
        log.info("QUIC is reachable again: moved to QUIC, draining the WebSocket link")
        old.goaway(ErrorCode.NO_ERROR, "moving to QUIC")
        task = asyncio.get_running_loop().create_task(_close_when_idle(old))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return new, handler


class LinkMoved(Exception):
    """The relay of this link drains: this slot links elsewhere while the old link finishes
    its streams (agent.links)."""


async def _close_when_idle(link: Link, timeout: float = 300.0) -> None:
    """A link told to go away closes by itself once its last stream ended; close it anyway
    after ``timeout``."""
    try:
        await asyncio.wait_for(link.wait_closed(), timeout)
    except asyncio.TimeoutError:
        link.close(ErrorCode.NO_ERROR, "drain timeout")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__

