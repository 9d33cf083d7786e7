"""Fixtures of the relay control-plane tests: the state on each back end, a fake data-plane
registry, and a real admin API server on loopback running its own event loop in a background
thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import threading
from pathlib import Path

import pytest

from relay.control.admin import load_or_create_admin_token, start_admin_server
from relay.state.cluster import Cluster
from relay.state.relay_state import RelayState
from relay.state.store.settings import StoreSettings
from relay.control.tokens import TokenAuthority
from tests.helpers.sync_state import SyncState, new_loop

# A uniquely named helper module (a bare ``import conftest`` could find another layer's).
from relay_fakes import FakeRegistry, run


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request) -> str:
    return request.param


@pytest.fixture
def database_url(request, backend):
    """``None`` (SQLite in the state dir) or a fresh PostgreSQL database."""
    if backend == "sqlite":
        return None
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def state(tmp_path, database_url):
    """A migrated, empty :class:`SyncState` on each back end."""
    loop = new_loop()
    st = loop.run_until_complete(RelayState.open(tmp_path / "state", database_url))
    sync = SyncState(st, loop)
    try:
        yield sync
    finally:
        sync.close()


class AdminServerThread:
    """A real admin server on 127.0.0.1 (port chosen by the OS) in a background loop."""

    def __init__(self, state_dir: Path, database_url: str | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.database_url = database_url
        self.registry = FakeRegistry()
        # The relay runs on uvloop: serve the tests from it too when it is installed.
        self.loop = new_loop()
        self._thread = threading.Thread(target=self._run, name="admin-server", daemon=True)
        self.state: RelayState | None = None
        self.cluster: Cluster | None = None
        self.authority: TokenAuthority | None = None
        self.token = ""
        self.url = ""
        self.port = 0

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    async def _start(self) -> None:
        self.state = await RelayState.open(self.state_dir, self.database_url)
        self.cluster = Cluster(self.state, self.registry, "wss://127.0.0.1:8443", StoreSettings())
        await self.cluster.start()
        self.authority = TokenAuthority(self.state_dir)
        self.token = load_or_create_admin_token(self.state_dir)
        self.server = await start_admin_server(
            "127.0.0.1", 0, state=self.state, authority=self.authority, registry=self.registry, token=self.token,
            cluster=self.cluster,
        )
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> "AdminServerThread":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=60)
        return self

    def call(self, fn, *args, **kwargs):
        """Run ``fn`` on the server's loop thread and return its result (awaited when ``fn``
        is a coroutine function)."""
        if inspect.iscoroutinefunction(fn):
            return asyncio.run_coroutine_threadsafe(fn(*args, **kwargs), self.loop).result(timeout=60)
        future: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001
                future.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return future.result(timeout=60)

    def stop(self) -> None:
        async def shutdown() -> None:
            self.server.close()
            await self.server.wait_closed()
            # Connections kept alive by clients: end their tasks before the loop goes.
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
            if self.cluster is not None:
                await self.cluster.stop()
            if self.state is not None:
                await self.state.close()

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(timeout=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=60)
            self.loop.close()


@pytest.fixture
def admin_server(tmp_path):
    server = AdminServerThread(tmp_path / "relay-state").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def relay(admin_server):
    """Runs ``tunnel-relay`` with ``--state-dir`` of the running admin server."""

    def invoke(*args: str, **kwargs):
        return run([*args, "--state-dir", str(admin_server.state_dir)], secret=admin_server.token, **kwargs)

    invoke.server = admin_server
    return invoke
