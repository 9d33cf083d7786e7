"""Fixtures of the relay control-plane tests: a fake data-plane registry and a real admin API
server on loopback, running its own event loop in a background thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from pathlib import Path

import pytest

from relay.admin import load_or_create_admin_token, start_admin_server
from relay.state import RelayState
from relay.tokens import TokenAuthority

# A uniquely named helper module (a bare ``import conftest`` could find another layer's).
from relay_fakes import FakeRegistry


class AdminServerThread:
    """A real admin server on 127.0.0.1 (port chosen by the OS) in a background loop."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.registry = FakeRegistry()
        # The relay runs on uvloop: serve the tests from it too when it is installed.
        try:
            import uvloop
        except ImportError:  # pragma: no cover
            self.loop = asyncio.new_event_loop()
        else:
            self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="admin-server", daemon=True)
        self.state: RelayState | None = None
        self.authority: TokenAuthority | None = None
        self.token = ""
        self.url = ""
        self.port = 0

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    async def _start(self) -> None:
        self.state = RelayState.open_dir(self.state_dir)
        self.authority = TokenAuthority(self.state_dir)
        self.token = load_or_create_admin_token(self.state_dir)
        self.server = await start_admin_server(
            "127.0.0.1", 0, state=self.state, authority=self.authority, registry=self.registry, token=self.token
        )
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> "AdminServerThread":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=60)
        return self

    def call(self, fn, *args, **kwargs):
        """Run ``fn`` on the server's loop thread and return its result."""
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

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(timeout=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=60)
            self.loop.close()
            if self.state is not None:
                self.state.close()


@pytest.fixture
def admin_server(tmp_path):
    server = AdminServerThread(tmp_path / "relay-state").start()
    try:
        yield server
    finally:
        server.stop()
