"""Fixtures for the adapter tests: every test runs under uvloop and under stock asyncio."""

from __future__ import annotations

import asyncio

import pytest
import uvloop


@pytest.fixture(params=["uvloop", "asyncio"])
def run(request):
    """``run(coro, timeout=60)``: run a coroutine to completion on a fresh loop of each
    flavour, failing it if it takes longer than ``timeout`` seconds."""
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def runner(coro, timeout: float = 60):
        async def bounded():
            async with asyncio.timeout(timeout):
                return await coro

        with asyncio.Runner(loop_factory=factory) as r:
            return r.run(bounded())

    return runner


@pytest.fixture
def wait_until():
    """The :func:`_wait_until` helper, for tests that poll a condition."""
    return _wait_until


async def _wait_until(condition, timeout: float = 20.0, what: str = "condition") -> None:
    """Wait for ``condition()`` to turn true, checking every loop turn (with a deadline)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)
