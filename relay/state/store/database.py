"""The interface both back ends implement (:func:`relay.state.store.connect.open_database` picks
one by URL).

A :class:`Database` runs SQL written once for both dialects (``?`` placeholders, the markers
of :mod:`relay.state.store.dialect`) and returns rows as dicts. Its calls are coroutines that never
block the event loop: SQLite runs on one worker thread, PostgreSQL on asyncpg. Failures come
out as :mod:`relay.state.store.errors` exceptions, never as driver exceptions.

Events (dicts with a ``kind``) published in a transaction with :meth:`Transaction.notify` reach
every subscriber of every relay on the database once the transaction commits: the publishing
relay's own subscribers at once, in process, as published; the other relays' through
PostgreSQL's LISTEN/NOTIFY as a **hint** only: ``{"kind": KIND, "hint": True}``. Any role that
can connect to the database can LISTEN and NOTIFY on any channel, so a notification carries no
data (just its kind and an opaque id of the publishing process, to skip its own echo) and is
never trusted: a subscriber that hears a hint re-reads the tables under its own role
(:mod:`relay.state.cluster`). A PostgreSQL database that comes back after an outage also delivers
``{"kind": "reconnected"}`` to its own subscribers, who then re-read what they may have missed.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from .dialect import Dialect

log = logging.getLogger("relay.store")

#: The notification channel every relay of a cluster listens on.
CHANNEL = "tunnel_relay"
#: The kinds of change a notification may name; any other notification is ignored.
HINT_KINDS = frozenset({"resource_created", "resource_updated", "rotated", "deleted", "relay_joined", "relay_left",
                        "relay_draining", "agents_revoked"})

Event = dict
Subscriber = Callable[[Event], None]


class Transaction(Protocol):
    async def fetch(self, sql: str, *args: Any) -> list[dict]: ...

    async def fetchrow(self, sql: str, *args: Any) -> dict | None: ...

    async def fetchval(self, sql: str, *args: Any) -> Any: ...

    async def execute(self, sql: str, *args: Any) -> int:
        """Run ``sql``; return the number of rows it changed."""

    async def notify(self, event: Event) -> None:
        """Publish ``event`` to every relay once this transaction commits."""


class Statements:
    """fetch/fetchrow/fetchval/execute, written once for both back ends and for their
    transactions: each implements ``_run(sql, args, mode)`` with ``mode`` one of ``"all"``
    (rows as dicts), ``"one"`` (the first row or None), ``"value"`` (its first column or None),
    ``"count"`` (rows changed)."""

    async def _run(self, sql: str, args: tuple, mode: str) -> Any:
        raise NotImplementedError

    async def fetch(self, sql: str, *args: Any) -> list[dict]:
        return await self._run(sql, args, "all")

    async def fetchrow(self, sql: str, *args: Any) -> dict | None:
        return await self._run(sql, args, "one")

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self._run(sql, args, "value")

    async def execute(self, sql: str, *args: Any) -> int:
        """Run ``sql``; return the number of rows it changed."""
        return await self._run(sql, args, "count")


class Subscribers:
    """The event subscribers of a back end: :meth:`subscribe` adds one, :meth:`_deliver` calls
    each with an event (one that raises is logged and does not stop the others)."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, callback: Subscriber) -> None:
        self._subscribers.append(callback)

    def _deliver(self, event: Event) -> None:
        for callback in list(self._subscribers):
            try:
                callback(event)
            except Exception:  # one subscriber must not stop the others
                log.exception("state event subscriber failed on %s", event.get("kind"))


class Database(Transaction, Protocol):
    """Single statements outside a transaction run on their own (autocommit)."""

    dialect: Dialect
    #: The URL without its password, for logs and admin output.
    description: str

    @property
    def available(self) -> bool: ...

    def transaction(self, timeout: float | None = None) -> AbstractAsyncContextManager[Transaction]:
        """A write transaction (exclusive on SQLite)."""

    def subscribe(self, callback: Subscriber) -> None: ...

    async def close(self) -> None: ...


def redact_url(url: str) -> str:
    """``url`` without its password (``postgresql://user@host:port/db``)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<malformed database URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    if parts.username:
        netloc = f"{parts.username}@{netloc}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def is_postgres_url(url: str | None) -> bool:
    return bool(url) and url.split("://", 1)[0].lower() in ("postgresql", "postgres")
