"""Several links, to distinct relays of a cluster: ``RELAY_LINKS`` (default 2) lives of
:class:`agent.runner.Agent`, one per *slot*, each dialling, registering and reconnecting on
its own (its own backoff), all sharing one agent instance id and one set of resources.

- **Which relay.** ``RELAY_URL`` names one relay (or a load balancer) or several, comma-
  separated. After ``registered`` a relay sends CONTROL ``relays`` (every live relay of the
  cluster, with the URL agents reach it at; again whenever that changes). Slot 0 dials the
  ``RELAY_URL`` entries in turn; the other slots dial relays learned so (or, before any is
  known, the ``RELAY_URL`` entries), never one another slot holds or one that drains. A slot
  with no such relay waits until one appears: with fewer relays than ``RELAY_LINKS``, the
  agent keeps one link per relay. Slot 0 alone, when every relay it could dial drains, dials
  the ``RELAY_URL`` entries all the same (a lone relay that restarts drains first).
- **Drain.** CONTROL ``draining`` from a relay: the slot marks that relay draining, dials
  another at once and registers there; only then does the old link get GOAWAY (the relay opens
  no new stream on it) and it closes once its streams have ended, or after ``DRAIN_TIMEOUT``.
  A slot told to move again soon after it registered backs off as a reconnect would, and at
  most ``MAX_RETIRING`` left links finish their streams at once (the oldest is closed), so a
  relay answering every registration with ``draining`` cannot spin or grow the agent.
- **Revocation** of a resource on one link ends it on every slot (the names dropped are
  shared); a fatal refusal on any slot stops the agent with its exit code.
- **One process, one view**: the private services' health (agent.health) is watched once and
  reported on every slot's link; SIGHUP reads the config file once and applies it to every
  slot; SIGTERM stops every slot gracefully (each drains its link up to ``DRAIN_TIMEOUT``).
- **Reconnecting**: each slot on its own, within a second after a link loss and backing off
  only while attempts keep failing (agent.runner).
"""

from __future__ import annotations

import asyncio
import logging
import os

from tunnel.bridge.dial import Dialer
from tunnel.carriers.base import Link
from tunnel.core.limits import Limits
from tunnel.wire.constants import ErrorCode

from .config import AgentConfig
from .config_watch import read_config, watch_config
from .health import TargetHealth
from .settings import AgentSettings
from .runner import Agent, close_when_idle

log = logging.getLogger("agent.links")

#: Most relays remembered from a ``relays`` message (a relay sending more is cut short).
MAX_RELAYS = 64
#: Most links left for another relay and still finishing their streams; beyond, the oldest
#: is closed at once.
MAX_RETIRING = 4


class AgentLinks:
    """The slots of one agent process (see the module docstring)."""

    def __init__(self, config: AgentConfig, limits: Limits | None = None, environ=None,
                 settings: AgentSettings | None = None, identity=None) -> None:
        self.config = config
        self.limits = limits or Limits.from_env()
        self.settings = settings or AgentSettings.from_env()
        self.environ = os.environ if environ is None else environ
        #: The key and certificate every slot presents (agent.identity), None without a state dir.
        self.identity = identity
        self.instance = identity.instance if identity is not None and identity.instance else os.urandom(6).hex()
        #: Names a relay deregistered -> why (agent.runner.Agent.dropped), for every slot.
        self.dropped: dict[str, str] = {}
        self.health = TargetHealth(self.settings.connect_timeout, self.settings.target_check_interval,
                                   on_change=self._health_changed)
        #: Relays learned from CONTROL ``relays``: id -> {"url", "draining"}; only those the
        #: configuration allows (AgentConfig.relay_allowed): the others are never dialled.
        self.relays: dict[str, dict] = {}
        self._refused: set[str] = set()
        #: Links a slot left for another relay, closing once their streams end (or after
        #: DRAIN_TIMEOUT), oldest first; at most MAX_RETIRING.
        self.retiring: dict[Link, None] = {}
        self._tasks: set[asyncio.Task] = set()
        self._changed = asyncio.Event()
        self.slots = [Agent(config, self.limits, environ=self.environ, slot=i, links=self, settings=self.settings)
                      for i in range(config.relay_links)]
        #: Per slot: the URL it dials or holds now, and how many times it tried the configured ones.
        self._urls: dict[int, str] = {}
        self._turn: dict[int, int] = {}
        #: Slots moving off a draining relay, and the link each leaves behind.
        self._moving: set[int] = set()
        self._retire: dict[int, Link] = {}

    # ---- choosing a relay

    def _taken(self, agent: Agent) -> tuple[set[str], set[str]]:
        """The relay ids and URLs the other slots hold or dial."""
        ids = {other.relay_id for other in self.slots if other is not agent and other.relay_id}
        urls = {self._urls[other.slot] for other in self.slots if other is not agent and other.slot in self._urls}
        urls.update(self.relays[rid]["url"] for rid in ids if rid in self.relays)
        return ids, urls

    def _candidates(self, agent: Agent) -> list[str]:
        ids, urls = self._taken(agent)
        draining = {r["url"] for r in self.relays.values() if r["draining"]}
        learned = [r["url"] for rid, r in self.relays.items()
                   if not r["draining"] and rid not in ids and r["url"] not in urls]
        configured = [u for u in self.config.relay_urls if u not in urls and u not in draining]
        if agent.slot == 0 and agent.slot not in self._moving:
            candidates = configured + [u for u in learned if u not in configured]
        elif self.relays:
            candidates = learned
        else:
            candidates = configured
        if not candidates and agent.slot == 0:
            # Every relay it could dial drains (or did: a lone relay restarting tells its agents
            # it drains, then comes back under the same URL). Slot 0 dials the configured ones
            # anyway, or the agent, linked nowhere, would never hear of a relay again.
            candidates = [u for u in self.config.relay_urls if u not in urls]
        return candidates

    async def dialer(self, agent: Agent) -> Dialer:
        """The dialler for ``agent``'s next attempt; waits while no relay is free for it."""
        while True:
            candidates = self._candidates(agent)
            if candidates:
                break
            self._urls.pop(agent.slot, None)
            self._changed.clear()
            await self._changed.wait()
        # Each attempt since the last registration tries the next candidate.
        url = candidates[self._turn.get(agent.slot, 0) % len(candidates)]
        self._turn[agent.slot] = self._turn.get(agent.slot, 0) + 1
        self._moving.discard(agent.slot)
        self._urls[agent.slot] = url
        current = agent.dialer
        if current is not None and getattr(current, "url", None) == url and current.ca_file == self.config.ca_file:
            return current  # keeps its QUIC probe state under auto://
        return Dialer(url, ca_file=self.config.ca_file, limits=self.limits, proxy_env=self.environ,
                      quic_engine=self.settings.quic_engine)

    # ---- what the links report

    def registered(self, agent: Agent, link: Link) -> None:
        """``agent``'s slot registered on ``link``: its old link (a drained relay's) may go."""
        self._turn[agent.slot] = 0
        old = self._retire.pop(agent.slot, None)
        if old is not None and old is not link and not old.is_closing:
            old.goaway(ErrorCode.NO_ERROR, "moved to another relay")
            self._spawn(self._close_retired(old))
        self._changed.set()

    async def _close_retired(self, link: Link) -> None:
        while len(self.retiring) >= MAX_RETIRING:
            oldest = next(iter(self.retiring))
            del self.retiring[oldest]
            log.info("closing a link left for another relay with %d open stream(s): more than %d links are being "
                     "left", oldest.stream_count, MAX_RETIRING)
            oldest.close(ErrorCode.NO_ERROR, "too many links being left")
        self.retiring[link] = None
        try:
            await close_when_idle(link, self.config.drain_timeout)
        finally:
            self.retiring.pop(link, None)

    def control(self, agent: Agent, handler, message: dict) -> None:
        """CONTROL ``relays`` or ``draining`` on one of ``agent``'s links."""
        if message.get("type") == "relays":
            self._learn(message.get("relays"), agent.relay_id)
            return
        relay_id = message.get("relay_id")
        if isinstance(relay_id, str) and relay_id in self.relays:
            self.relays[relay_id]["draining"] = True
        log.info("relay %s drains: moving link %d to another relay", str(relay_id)[:64], agent.slot)
        self._moving.add(agent.slot)
        self._retire[agent.slot] = handler.link
        if not handler.moving.done():
            handler.moving.set_result(None)
        self._changed.set()

    def _learn(self, relays, sender: str | None = None) -> None:
        if not isinstance(relays, list):
            return
        learned = {}
        refused = []
        for entry in relays[:MAX_RELAYS]:
            if not isinstance(entry, dict):
                continue
            relay_id, url = entry.get("id"), entry.get("url")
            if not isinstance(relay_id, str) or not isinstance(url, str) or not _dialable(url):
                continue
            if not self.config.relay_allowed(url):
                if relay_id != sender:  # the relay linked already, under another name: not news
                    refused.append(url)
                continue
            learned[relay_id[:64]] = {"url": url, "draining": entry.get("draining") is True}
        if learned != self.relays:
            self.relays = learned
            log.info("relays of the cluster: %s", ", ".join(f"{r['url']}{' (draining)' if r['draining'] else ''}"
                                                            for r in learned.values()) or "none")
            self._changed.set()
        if refused and set(refused) != self._refused:
            log.warning("not dialling %s, named by the cluster: outside RELAY_URL's domain and RELAY_ALLOW_HOSTS",
                        ", ".join(refused))
        self._refused = set(refused)

    def _health_changed(self, name: str) -> None:
        for agent in self.slots:
            agent.health_changed(name)

    def _targets(self):
        return [t for t in self.config.targets if t.name not in self.dropped]

    # ---- life

    def reload(self, why: str = "SIGHUP") -> bool:
        """Read the config file again (once) and apply it on every slot (agent.runner); False
        when it is refused."""
        new = read_config(self.config, self.environ, why)
        if new is None:
            return False
        if new.relay_links != self.config.relay_links:
            log.warning("%s: relay_links changed: takes effect at the next start", why)
        self.config = new
        self.relays = {rid: r for rid, r in self.relays.items() if new.relay_allowed(r["url"])}
        for agent in self.slots:
            agent.apply_config(new, why)
        self._changed.set()  # RELAY_URL may have changed: waiting slots look again
        return True

    def stop(self) -> None:
        """Graceful stop (SIGTERM) of every slot (agent.runner.Agent.stop)."""
        for agent in self.slots:
            agent.stop()

    @property
    def stopping(self) -> bool:
        return any(agent.stopping for agent in self.slots)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def run(self) -> int:
        """Run every slot until one stops for good (a fatal refusal: its exit code) or a
        graceful stop ended them all (0)."""
        tasks = [asyncio.get_running_loop().create_task(agent.run()) for agent in self.slots]
        self._spawn(self.health.run(self._targets))
        if self.settings.config_watch_interval > 0 and self.config.config_file:
            self._spawn(watch_config(self.config.config_file, self.settings.config_watch_interval, self.reload))
        try:
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            code = next(iter(done)).result()
            if code == 0 and pending:
                await asyncio.wait(pending)  # a graceful stop: every slot drains its link
            return code
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for task in list(self._tasks):
                task.cancel()
            for link in list(self.retiring):
                link.close(ErrorCode.NO_ERROR, "agent stopping")


def _dialable(url: str) -> bool:
    """A URL a relay may hand out: ``wss://``, ``quic://`` or ``auto://`` with a host (the
    agent still verifies that relay's certificate with its own trust anchor)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        parts.port
    except ValueError:
        return False
    return parts.scheme in ("wss", "quic", "auto") and bool(parts.hostname) and len(url) <= 512
