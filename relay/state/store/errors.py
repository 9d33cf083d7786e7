"""The store's exceptions, one tree::

    StoreError              a state database operation failed
    ├── StoreUnavailable    the database cannot be reached (or is not answering) right now;
    │   │                   the relay refuses what needs it and recovers by itself
    │   └── StateWriteFailed  the state directory refuses SQLite's writes (full, read-only)
    ├── Conflict            a uniqueness or reference rule refused the write (retry or report)
    └── SchemaTooNew        the database was migrated by a newer relay than this one
"""

from __future__ import annotations

import errno
import sqlite3

#: What agents and admin clients are told while the database is away.
UNREACHABLE_MESSAGE = "state database unreachable"


class StoreError(Exception):
    """A state database operation failed."""


class StoreUnavailable(StoreError):
    """The state database is unreachable; ``reason`` says why (never a secret)."""

    def __init__(self, reason: str = "") -> None:
        super().__init__(UNREACHABLE_MESSAGE + (f": {reason}" if reason else ""))
        self.reason = reason


class StateWriteFailed(StoreUnavailable):
    """The state directory refuses writes; the message says how (``state directory full
    …``); reads go on, and writes work again once it is fixed."""

    def __init__(self, failure: str) -> None:
        StoreError.__init__(self, failure)
        self.reason = failure


def state_write_failure(exc: BaseException) -> str | None:
    """A one-line description when ``exc`` is the state directory refusing a write (full,
    read-only, I/O error); None for anything else (a bug, worth its traceback)."""
    if isinstance(exc, StateWriteFailed):
        return exc.reason
    if isinstance(exc, sqlite3.OperationalError):
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
        if code == 13:  # SQLITE_FULL
            return "state directory full (no space left for the database)"
        if code == 8:  # SQLITE_READONLY
            return "state directory read-only (the database cannot be written)"
        if code == 10:  # SQLITE_IOERR
            return "state directory write failed (disk I/O error)"
    elif isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return "state directory full (no space left on device)"
        if exc.errno == errno.EROFS:
            return "state directory read-only"
        if exc.errno == errno.EIO:
            return "state directory write failed (I/O error)"
    return None


class Conflict(StoreError):
    """A unique or foreign key constraint refused the write."""


class SchemaTooNew(StoreError):
    """The database's schema version is above the newest this code knows."""

    def __init__(self, where: str, found: int, known: int) -> None:
        super().__init__(
            f"{where} has schema version {found}, newer than this relay's {known}: "
            "it was migrated by a newer relay; run that version (or newer) of the relay"
        )
        self.found = found
        self.known = known
