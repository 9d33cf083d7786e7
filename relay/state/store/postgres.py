"""The cluster back end: PostgreSQL through asyncpg.

Why asyncpg (bench/bench_pg_drivers.py, figures in docs/CLUSTER.md): it adds 2.7 MB to a relay
where psycopg 3 adds 10 MB, its round trips are about 40 % shorter, its LISTEN/NOTIFY is a
callback on the event loop, and a query to a hung server gives up at its timeout, where
psycopg's cancellation waited 11 s. Both ship wheels for Python 3.11 (no compiler, no libpq).
Only the relay imports it, and only for a ``postgresql://`` URL.

Connections: a pool for queries and one connection that LISTENs on :data:`CHANNEL` and is
pinged every ``heartbeat_interval``. Any connection failure or timeout marks the database
unreachable: calls then fail at once with :class:`StoreUnavailable` (no waiting per request),
the outage is logged once, and one task reconnects with jittered exponential backoff. Once
back, subscribers get ``{"kind": "reconnected"}`` and re-read what they may have missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import secrets
import time
import urllib.parse
from typing import Any

import asyncpg

from .database import CHANNEL, HINT_KINDS, Event, Statements, Subscribers, redact_url
from .dialect import POSTGRES
from .errors import Conflict, StoreError, StoreUnavailable
from .settings import StoreSettings

log = logging.getLogger("relay.store")

#: Failures that mean "the server is not there (or not answering)", not "the query was wrong".
_UNREACHABLE = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,
    asyncpg.exceptions.InvalidPasswordError,
    # A connection left in a broken protocol state by a server that went away mid-query
    # ("cannot switch to state …; another operation is in progress").
    asyncpg.exceptions.InternalClientError,
)
_CONFLICT = (asyncpg.exceptions.IntegrityConstraintViolationError,)


class PostgresDatabase(Statements, Subscribers):
    dialect = POSTGRES

    def __init__(self, url: str, settings: StoreSettings) -> None:
        self._url = url
        self.settings = settings
        self.description = redact_url(url)
        self._password = urllib.parse.urlsplit(url).password or ""
        #: Identifies this process's notifications, so it does not apply its own twice.
        self.origin = secrets.token_hex(8)
        self._pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None
        Subscribers.__init__(self)
        self._available = False
        self._reason = "not connected yet"
        self._down_since = 0.0
        self._reconnect_task: asyncio.Task | None = None
        self._watchdog_task: asyncio.Task | None = None
        self._closed = False

    @classmethod
    async def connect(cls, url: str, settings: StoreSettings) -> "PostgresDatabase":
        """Connected (pool and listener), or :class:`StoreUnavailable`."""
        db = cls(url, settings)
        try:
            await db._establish()
        except _UNREACHABLE + (asyncpg.PostgresError,) as exc:
            await db._teardown()
            raise StoreUnavailable(db._describe(exc)) from None
        db._available = True
        db._watchdog_task = asyncio.get_running_loop().create_task(db._watchdog())
        return db

    @property
    def available(self) -> bool:
        return self._available

    # ---- connections

    async def _establish(self) -> None:
        s = self.settings
        if self._pool is None:
            # min_size 0: connections on demand, and no background "floor" task that would log
            # a traceback per failed attempt while the server is away.
            self._pool = await asyncpg.create_pool(
                self._url, min_size=0, max_size=s.db_pool_size, timeout=s.db_connect_timeout,
                command_timeout=s.db_query_timeout, max_inactive_connection_lifetime=60.0,
                reset=_keep_session,
            )
        async with self._pool.acquire(timeout=s.db_connect_timeout) as conn:
            await conn.fetchval("SELECT 1", timeout=s.db_query_timeout)
        listener = await asyncpg.connect(self._url, timeout=s.db_connect_timeout)
        try:
            await listener.add_listener(CHANNEL, self._on_notification)
            listener.add_termination_listener(self._on_listener_terminated)
        except BaseException:
            listener.terminate()
            raise
        self._listener = listener

    async def _teardown(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.terminate()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.terminate()

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, asyncio.TimeoutError):
            text = "timed out"
        elif isinstance(exc, OSError) and exc.strerror:
            text = exc.strerror
        else:
            text = str(exc) or type(exc).__name__
        text = " ".join(text.split())[:300]
        return text.replace(self._password, "***") if self._password else text

    def _lost(self, exc: BaseException | str) -> None:
        """The database stopped answering: fail fast from now on, log once, reconnect."""
        reason = exc if isinstance(exc, str) else self._describe(exc)
        if not self._available or self._closed:
            return
        self._available = False
        self._reason = reason
        self._down_since = time.monotonic()
        log.warning("state database %s unreachable: %s; serving the agents already connected, refusing "
                    "registrations and admin changes, reconnecting", self.description, reason)
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.terminate()
        loop = asyncio.get_running_loop()
        if self._pool is not None:
            # Idle connections are dead too; the pool replaces them when next acquired.
            loop.create_task(self._pool.expire_connections())
        if self._reconnect_task is None or self._reconnect_task.done():
            self._reconnect_task = loop.create_task(self._reconnect())

    async def _reconnect(self) -> None:
        delay = 0.2
        while not self._closed:
            await asyncio.sleep(random.uniform(delay / 2, delay))
            delay = min(self.settings.db_reconnect_max, delay * 2)
            try:
                await self._establish()
            except _UNREACHABLE + (asyncpg.PostgresError,) as exc:
                self._reason = self._describe(exc)
                log.debug("state database still unreachable: %s", self._reason)
                continue
            self._available = True
            log.warning("state database %s reachable again after %.1f s", self.description,
                        time.monotonic() - self._down_since)
            self._deliver({"kind": "reconnected"})
            return

    async def _watchdog(self) -> None:
        """Ping through the listening connection: a server that hangs (or a path that drops
        packets) sends no error, so silence has to be noticed."""
        while not self._closed:
            await asyncio.sleep(self.settings.heartbeat_interval)
            listener = self._listener
            if not self._available or listener is None:
                continue
            try:
                await listener.fetchval("SELECT 1", timeout=self.settings.db_query_timeout)
            except _UNREACHABLE as exc:
                self._lost(exc)
            except asyncpg.PostgresError as exc:
                log.warning("state database ping failed: %s", self._describe(exc))

    def _on_listener_terminated(self, conn) -> None:
        if conn is self._listener:
            self._lost("the server closed the connection")

    # ---- statements

    def _check(self) -> None:
        if self._closed:
            raise StoreUnavailable("closed")
        if not self._available:
            raise StoreUnavailable(self._reason)

    def _translate(self, exc: BaseException) -> StoreError:
        if isinstance(exc, _CONFLICT):
            return Conflict(self._describe(exc))
        if isinstance(exc, _UNREACHABLE):
            self._lost(exc)
            return StoreUnavailable(self._describe(exc))
        return StoreError(self._describe(exc))

    async def _one(self, conn, sql: str, args: tuple, mode: str, timeout: float | None) -> Any:
        query = POSTGRES.render(sql)
        timeout = timeout or self.settings.db_query_timeout
        try:
            if mode == "all":
                return [dict(r) for r in await conn.fetch(query, *args, timeout=timeout)]
            if mode == "one":
                row = await conn.fetchrow(query, *args, timeout=timeout)
                return dict(row) if row is not None else None
            if mode == "value":
                return await conn.fetchval(query, *args, timeout=timeout)
            status = await conn.execute(query, *args, timeout=timeout)
        except (asyncpg.PostgresError,) + _UNREACHABLE as exc:
            if isinstance(exc, _UNREACHABLE):
                conn.terminate()  # a half-done query leaves the connection unusable
            raise self._translate(exc) from None
        # "UPDATE 3", "INSERT 0 1", "DELETE 0", "CREATE TABLE" ...
        last = status.rsplit(" ", 1)[-1]
        return int(last) if last.isdigit() else 0

    async def _run(self, sql: str, args: tuple, mode: str) -> Any:
        """One statement on a connection of the pool (autocommit)."""
        self._check()
        try:
            async with self._pool.acquire(timeout=self.settings.db_connect_timeout) as conn:
                return await self._one(conn, sql, args, mode, None)
        except (asyncpg.PostgresError,) + _UNREACHABLE as exc:
            raise self._translate(exc) from None

    @contextlib.asynccontextmanager
    async def transaction(self, timeout: float | None = None):
        self._check()
        tx: _Transaction | None = None
        try:
            async with self._pool.acquire(timeout=self.settings.db_connect_timeout) as conn:
                transaction = conn.transaction()
                await transaction.start()
                tx = _Transaction(self, conn, timeout)
                try:
                    yield tx
                    await transaction.commit()
                except BaseException:
                    if not conn.is_closed():
                        try:
                            await asyncio.wait_for(transaction.rollback(), self.settings.db_query_timeout)
                        except (asyncpg.PostgresError,) + _UNREACHABLE:
                            conn.terminate()
                    raise
        except (asyncpg.PostgresError,) + _UNREACHABLE as exc:
            raise self._translate(exc) from None
        for event in tx.events:
            self._deliver(event)

    # ---- events

    def _on_notification(self, conn, pid: int, channel: str, payload: str) -> None:
        # Anyone who can connect may NOTIFY: only the kind is taken, as a hint to re-read.
        try:
            event = json.loads(payload)
        except ValueError:
            event = None
        if not isinstance(event, dict) or event.get("kind") not in HINT_KINDS:
            return
        if event.get("origin") == self.origin:
            return  # ours: already delivered in process at commit
        self._deliver({"kind": event["kind"], "hint": True})

    async def close(self) -> None:
        self._closed = True
        for task in (self._reconnect_task, self._watchdog_task):
            if task is not None:
                task.cancel()
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                await asyncio.wait_for(listener.close(), self.settings.db_query_timeout)
            except (asyncpg.PostgresError,) + _UNREACHABLE:
                listener.terminate()
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), self.settings.db_query_timeout)
            except (asyncpg.PostgresError,) + _UNREACHABLE:
                pool.terminate()


async def _keep_session(conn) -> None:
    """The pool's reset of a connection it takes back, after asyncpg's own (an open transaction
    rolled back): nothing more. Its default (``RESET ALL``, ``UNLISTEN *``, advisory unlocks,
    ``CLOSE ALL``) is one more round trip and one more query for PostgreSQL per statement, and
    a registration runs about ten; the relay leaves no session state on pool connections to
    undo (its LISTEN has a connection of its own, the migration lock is a transaction's)."""


class _Transaction(Statements):
    def __init__(self, db: PostgresDatabase, conn, timeout: float | None) -> None:
        self._db = db
        self._conn = conn
        self._timeout = timeout
        self.events: list[Event] = []

    async def _run(self, sql: str, args: tuple, mode: str) -> Any:
        return await self._db._one(self._conn, sql, args, mode, self._timeout)

    async def notify(self, event: Event) -> None:
        # PostgreSQL delivers it to every listener at commit, and never if we roll back. Every
        # role that can connect may LISTEN: the payload names the kind of change, nothing more.
        payload = json.dumps({"kind": event["kind"], "origin": self._db.origin}, separators=(",", ":"))
        await self.execute("SELECT pg_notify(?, ?)", CHANNEL, payload)
        self.events.append(event)
