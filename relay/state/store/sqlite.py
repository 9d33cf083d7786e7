"""The embedded back end: one SQLite file (``<state-dir>/relay.db``, WAL, mode 0600).

Every statement runs on one worker thread, so a slow disk or a lock held by another process
never stalls the event loop; an ``asyncio.Lock`` keeps one transaction at a time on the
connection. Write transactions start with ``BEGIN IMMEDIATE`` (SQLite's single writer lock,
which also serialises migrations between processes). Events go to this process's subscribers
after commit: a SQLite file has one relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .database import Event, Statements, Subscribers
from .dialect import SQLITE
from .errors import Conflict, StateWriteFailed, StoreError, StoreUnavailable, state_write_failure
from .settings import StoreSettings
from ..files import ensure_state_dir

log = logging.getLogger("relay.store")


def _translate(exc: sqlite3.Error) -> StoreError:
    if isinstance(exc, sqlite3.IntegrityError):
        return Conflict(str(exc))
    failure = state_write_failure(exc)
    if failure is not None:
        return StateWriteFailed(failure)
    if isinstance(exc, sqlite3.OperationalError):
        # "database is locked" past the busy timeout, ...
        return StoreUnavailable(str(exc))
    return StoreError(str(exc))


class _Statements(Statements):
    """Statements on the worker thread (the database's and its transactions')."""

    _db: "SqliteDatabase"

    async def _run(self, sql: str, args: tuple, mode: str) -> Any:
        return await self._db._on_thread(self._db._statement, SQLITE.render(sql), args, mode)


class _Transaction(_Statements):
    def __init__(self, db: "SqliteDatabase") -> None:
        self._db = db
        self.events: list[Event] = []

    async def notify(self, event: Event) -> None:
        self.events.append(event)


class SqliteDatabase(_Statements, Subscribers):
    dialect = SQLITE

    def __init__(self, path: str | os.PathLike, settings: StoreSettings | None = None) -> None:
        self.path = Path(path)
        self.description = f"sqlite:///{self.path}"
        self.settings = settings or StoreSettings()
        ensure_state_dir(self.path.parent)
        if not self.path.exists():
            # Create the file with 0600 before SQLite opens it.
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        self._db = self
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-sqlite")
        self._lock = asyncio.Lock()
        Subscribers.__init__(self)
        self._conn = self._executor.submit(self._open).result()

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                               timeout=self.settings.db_query_timeout)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    @property
    def available(self) -> bool:
        return True

    # ---- the worker thread

    async def _on_thread(self, fn, *args) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    def _statement(self, sql: str, args: tuple, mode: str) -> Any:
        try:
            cursor = self._conn.execute(sql, args)
            if mode == "count":
                return cursor.rowcount
            rows = cursor.fetchall()  # to the end: a RETURNING statement is then complete
            if mode == "all":
                return [dict(row) for row in rows]
            row = rows[0] if rows else None
            if mode == "one":
                return dict(row) if row is not None else None
            return row[0] if row is not None else None
        except sqlite3.Error as exc:
            raise _translate(exc) from None

    async def _run(self, sql: str, args: tuple, mode: str) -> Any:
        async with self._lock:
            return await super()._run(sql, args, mode)

    # ---- transactions and events

    @contextlib.asynccontextmanager
    async def transaction(self, timeout: float | None = None):
        async with self._lock:
            await self._on_thread(self._statement, "BEGIN IMMEDIATE", (), "count")
            tx = _Transaction(self)
            try:
                yield tx
                await self._on_thread(self._statement, "COMMIT", (), "count")
            except BaseException:
                await asyncio.shield(self._on_thread(self._rollback))
                raise
        for event in tx.events:
            self._deliver(event)

    def _rollback(self) -> None:
        try:
            self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # no transaction left to roll back

    async def close(self) -> None:
        try:
            await self._on_thread(self._conn.close)
        finally:
            self._executor.shutdown(wait=True)

    def close_sync(self) -> None:
        """Close from outside any event loop (tests, tools)."""
        self._executor.submit(self._conn.close).result()
        self._executor.shutdown(wait=True)
