"""Timings of the relay's state database and cluster membership: one object, overridable by
``RELAY_<FIELD>`` environment variables (``RELAY_HEARTBEAT_INTERVAL=2``); docs/CLUSTER.md lists
every field."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping


@dataclasses.dataclass(frozen=True, slots=True)
class StoreSettings:
    #: Give up connecting to PostgreSQL after this long (seconds).
    db_connect_timeout: float = 5.0
    #: Give up on one query after this long (seconds); the database then counts as unreachable.
    db_query_timeout: float = 5.0
    #: Longest wait for the migration lock and the migration itself at start (seconds).
    db_migration_timeout: float = 300.0
    #: How long a starting relay keeps trying to reach its database before it gives up (seconds).
    db_startup_timeout: float = 30.0
    #: Reconnect backoff ceiling (seconds); the first retry comes after a fifth of a second.
    db_reconnect_max: float = 5.0
    #: PostgreSQL connections per relay (besides the one that listens for notifications).
    db_pool_size: int = 4
    #: A relay refreshes its membership row this often (seconds) ...
    heartbeat_interval: float = 5.0
    #: ... and a relay whose row is older than this is taken for gone, with its agent links.
    member_ttl: float = 20.0
    #: While the database is away, refusals are summed up in the log at most this often (seconds).
    outage_log_interval: float = 10.0

    def validate(self) -> "StoreSettings":
        for field in dataclasses.fields(self):
            if getattr(self, field.name) <= 0:
                raise ValueError(f"{field.name} must be positive")
        if self.member_ttl <= 2 * self.heartbeat_interval:
            raise ValueError("member_ttl must exceed twice heartbeat_interval")
        return self

    def replace(self, **changes) -> "StoreSettings":
        return dataclasses.replace(self, **changes).validate()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "StoreSettings":
        environ = os.environ if environ is None else environ
        changes = {}
        for field in dataclasses.fields(cls):
            name = "RELAY_" + field.name.upper()
            raw = environ.get(name)
            if not raw:
                continue
            kind = int if field.type in ("int", int) else float
            try:
                changes[field.name] = kind(raw)
            except ValueError:
                raise ValueError(f"{name} must be a number, got {raw!r}") from None
        return dataclasses.replace(cls(), **changes).validate()
