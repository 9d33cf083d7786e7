"""Calling the relay's async state from synchronous test code."""

from __future__ import annotations

import asyncio
import inspect


def new_loop() -> asyncio.AbstractEventLoop:
    """A loop of the kind the relay runs on (uvloop when installed)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class SyncState:
    """A :class:`relay.state.RelayState` whose coroutine methods run to completion on
    ``loop``, so that contract tests read like the calls they make; ``state`` is the real one."""

    def __init__(self, state, loop: asyncio.AbstractEventLoop) -> None:
        self.state = state
        self.loop = loop

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def __getattr__(self, name: str):
        value = getattr(self.state, name)
        if inspect.iscoroutinefunction(value):
            return lambda *args, **kwargs: self.run(value(*args, **kwargs))
        return value

    def close(self) -> None:
        self.run(self.state.close())
        self.loop.close()
