"""The store's exceptions, one tree::

    StoreError              a state database operation failed
    ├── StoreUnavailable    the database cannot be reached (or is not answering) right now;
    │                       the relay refuses what needs it and recovers by itself
    ├── Conflict            a uniqueness or reference rule refused the write (retry or report)
    └── SchemaTooNew        the database was migrated by a newer relay than this one
"""

from __future__ import annotations

#: What agents and admin clients are told while the database is away.
UNREACHABLE_MESSAGE = "state database unreachable"


class StoreError(Exception):
    """A state database operation failed."""


class StoreUnavailable(StoreError):
    """The state database is unreachable; ``reason`` says why (never a secret)."""

    def __init__(self, reason: str = "") -> None:
        super().__init__(UNREACHABLE_MESSAGE + (f": {reason}" if reason else ""))
        self.reason = reason


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
