"""Opens the database a URL names: PostgreSQL (a cluster's) or SQLite (the default, in the
state directory)."""

from __future__ import annotations

import urllib.parse
from pathlib import Path

from relay import DATABASE_FILE

from .database import Database, is_postgres_url, redact_url
from .errors import StoreError
from .settings import StoreSettings
from .sqlite import SqliteDatabase


async def open_database(url: str | None, state_dir: str | Path, settings: StoreSettings | None = None) -> Database:
    """The database at ``url``: ``postgresql://…`` (or ``postgres://``), ``sqlite:///path``, or
    ``None``/empty for ``<state_dir>/relay.db``. Not yet migrated. Raise ``ValueError`` for a URL
    of another kind, :class:`StoreUnavailable` when PostgreSQL cannot be reached."""
    settings = settings or StoreSettings()
    if is_postgres_url(url):
        try:  # asyncpg is an optional dependency (the postgresql extra)
            from .postgres import PostgresDatabase
        except ImportError:
            raise StoreError("PostgreSQL needs the asyncpg driver: pip install 'tunnel-agent-relay[postgresql]'") from None
        return await PostgresDatabase.connect(url, settings)
    if url:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "sqlite" or not parts.path:
            raise ValueError(f"unsupported database URL {redact_url(url)!r}: "
                             "expected postgresql://user@host:port/dbname or sqlite:///path/to/relay.db")
        path = Path(urllib.parse.unquote(parts.path))
    else:
        path = Path(state_dir) / DATABASE_FILE
    return SqliteDatabase(path, settings)
