"""Whether each private service answers: learnt from the agent's real dials and, while a
service sees none, from a light periodic check (one TCP connection opened and closed, every
``AgentSettings.target_check_interval``; 0 turns the check off).

A change is logged once (WARNING when a service stops answering, with the fix; INFO when it
answers again) and handed to ``on_change``, which tells the relay (CONTROL ``target_health``,
docs/PROTOCOL.md). The relay shows it in ``resources list``, logs why a worker's connection was
reset, and prefers agents whose service answers. The agent's metrics export it
(``tunnel_agent_target_reachable``, beside ``tunnel_agent_dial_failures_total``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .hints import REASON_TEXT, target_failure

log = logging.getLogger("agent.health")


@dataclass
class TargetState:
    """What the agent knows of one resource's private service."""

    #: True: it accepted the last connection; False: the last one failed; None: not tried yet.
    reachable: bool | None = None
    #: Why it failed (hints.DNS, REFUSED, TIMEOUT, UNREACHABLE, ERROR); "" while reachable.
    reason: str = ""
    #: The failure with the address, for the agent's own log.
    detail: str = ""
    #: When ``reachable`` took its value (time.time()).
    since: float = 0.0
    #: When a dial last succeeded (monotonic), 0 if never.
    last_success: float = 0.0


class TargetHealth:
    """The health of every target of one agent."""

    def __init__(self, connect_timeout: float, interval: float,
                 on_change: Callable[[str], None] | None = None, clock=time.monotonic) -> None:
        self.connect_timeout = connect_timeout
        self.interval = interval
        self.on_change = on_change
        self._clock = clock
        self.states: dict[str, TargetState] = {}

    def result(self, target, exc: BaseException | None) -> None:
        """A dial or check of ``target`` (agent.config.Target) succeeded (``exc`` None) or failed."""
        state = self.states.setdefault(target.name, TargetState())
        if exc is None:
            state.last_success = self._clock()
            if state.reachable is not True:
                if state.reachable is False:
                    log.info("resource %s: %s answers again", target.name, target.address)
                else:
                    log.debug("resource %s: %s answers", target.name, target.address)
                state.reachable, state.reason, state.detail, state.since = True, "", "", time.time()
                self._changed(target.name)
            return
        reason, detail, fix = target_failure(target, exc, self.connect_timeout)
        if state.reachable is not False or state.reason != reason:
            log.warning("resource %s: %s -> fix: %s; workers' connections to it are reset meanwhile",
                        target.name, detail, fix)
            state.reachable, state.reason, state.detail, state.since = False, reason, detail, time.time()
            self._changed(target.name)
        else:
            log.debug("resource %s: %s (still)", target.name, detail)

    def forget(self, name: str) -> None:
        self.states.pop(name, None)

    def report(self, names: Iterable[str]) -> list[dict]:
        """The ``resources`` of a CONTROL ``target_health`` for ``names`` with a known state.

        No address goes to the relay: the layout of the private network is the customer's."""
        entries = []
        for name in names:
            state = self.states.get(name)
            if state is None or state.reachable is None:
                continue
            entry: dict = {"name": name, "reachable": state.reachable, "since": int(state.since)}
            if not state.reachable:
                entry["reason"] = state.reason
                entry["message"] = REASON_TEXT.get(state.reason, REASON_TEXT["error"])
            entries.append(entry)
        return entries

    def _changed(self, name: str) -> None:
        if self.on_change is not None:
            self.on_change(name)

    # --- the periodic check -----------------------------------------------------------

    async def check(self, target) -> None:
        """Open one TCP connection to ``target`` and close it at once; record the outcome."""
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await asyncio.wait_for(
                loop.create_connection(asyncio.Protocol, target.host, target.port), self.connect_timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            self.result(target, exc)
            return
        transport.close()
        self.result(target, None)

    def due(self, target, now: float | None = None) -> bool:
        """True when ``target`` had no successful dial for ``interval`` (or is failing)."""
        state = self.states.get(target.name)
        if state is None or not state.reachable:
            return True
        now = self._clock() if now is None else now
        return now - state.last_success >= self.interval

    async def run(self, targets: Callable[[], Iterable]) -> None:
        """Forever: check each of ``targets()`` that is due, then wait ``interval``."""
        if self.interval <= 0:
            return
        while True:
            due = [t for t in targets() if self.due(t)]
            if due:
                await asyncio.gather(*(self.check(t) for t in due))
            await asyncio.sleep(self.interval)
