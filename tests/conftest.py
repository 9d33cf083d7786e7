"""Fixtures shared by every test layer.

``run`` runs a coroutine on uvloop and on stock asyncio, one test each; ``codec`` runs a test once per frame codec: the compiled ``tunnel._frames`` and its pure-Python
twin ``tunnel.codec.pure``; ``codec_pair`` gives both at once, for tests that compare them. The compiled one is skipped only when it is not built (CI builds it,
and ``tests/unit/test_frames.py::test_compiled_codec_is_in_use`` fails there if it is missing).
"""

from __future__ import annotations

import asyncio
import os

import pytest
import uvloop
from hypothesis import HealthCheck, settings

from tests.helpers.codecs import CODEC_MODULES, NOT_BUILT, both_codecs, load_codec

# Modest example counts and no per-example deadline: the suite runs on small, shared, loaded
# machines. HYPOTHESIS_PROFILE=thorough digs deeper when hunting a bug.
settings.register_profile(
    "tunnel", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "tunnel"))



@pytest.fixture(params=sorted(CODEC_MODULES), ids=lambda kind: kind)
def codec(request):
    """Each frame codec module in turn (same API: see tunnel/_frames.pyi)."""
    module = load_codec(request.param)
    if module is None:
        pytest.skip(NOT_BUILT)
    return module


@pytest.fixture
def codec_pair():
    """``(compiled, twin)``: the two frame codec modules, for tests that compare them."""
    return both_codecs()


@pytest.fixture
def cleanup() -> list:
    """Callables ``run`` calls (in order) before its event loop ends: close what a test
    opened inside the loop."""
    return []


@pytest.fixture(params=["uvloop", "asyncio"])
def run(request, cleanup):
    """``run(coro, timeout=120)``: run a coroutine to completion on a fresh loop of each
    flavour, failing it if it takes longer than ``timeout`` seconds; then run ``cleanup``."""
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def runner(coro, timeout: float = 120):
        async def bounded():
            try:
                async with asyncio.timeout(timeout):
                    return await coro
            finally:
                for close in cleanup:
                    try:
                        close()
                    except Exception:  # noqa: BLE001 - already closed
                        pass
                for _ in range(5):
                    await asyncio.sleep(0)

        with asyncio.Runner(loop_factory=factory) as r:
            return r.run(bounded())

    return runner


# --------------------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="session")
def postgres_server():
    """One real PostgreSQL for the whole session (Debian's binaries, initdb in a temporary
    directory, loopback, a free port), started on first use and destroyed at the end."""
    from tests.helpers.postgres import PostgresServer, bin_dir

    if bin_dir() is None:
        pytest.fail("PostgreSQL server binaries are missing: run scripts/setup.sh (Debian package postgresql)")
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def postgres_url(postgres_server):
    """A fresh, empty database on the session's PostgreSQL (dropped afterwards); its URL
    carries the password."""
    name = postgres_server.create_database()
    try:
        yield postgres_server.url(name)
    finally:
        if not postgres_server.running():  # a test that stopped it and failed before restarting
            postgres_server.start()
        postgres_server.drop_database(name)
