"""Every difference between SQLite and PostgreSQL that the store's SQL meets, in one place.

Queries are written once, with ``?`` placeholders and these ``{markers}``, and rendered per
dialect by :meth:`Dialect.render`:

==================  ==========================================  ==========================
marker              SQLite                                      PostgreSQL
==================  ==========================================  ==========================
``{seq_column}``    nothing (the implicit ``rowid`` orders)     an identity column ``seq``
``{seq}``           ``rowid``                                   ``seq``
``{real}``          ``REAL``                                    ``DOUBLE PRECISION``
``{now}``           seconds since 1970 from ``julianday``       ``clock_timestamp()``
``{next_epoch}``    (a statement) bump a row of ``sequences``   ``SELECT nextval(…)``
``{iso_epoch:C}``   ``strftime('%s', C)``                       ``EXTRACT(EPOCH FROM C)``
==================  ==========================================  ==========================

Placeholders: ``?`` for sqlite3, ``$1 … $n`` for asyncpg (numbered by :func:`number_placeholders`, which
leaves a ``?`` in a string literal, quoted identifier or comment alone). The schema version is kept in
``PRAGMA user_version`` on SQLite (as relay.db files have always had it, so that an older relay
refuses a newer file) and in the ``schema_migrations`` table on PostgreSQL (both keep a history
row per step in ``schema_migrations``). Migrations run in one transaction that SQLite's
``BEGIN IMMEDIATE`` (every write transaction here) or PostgreSQL's advisory lock
:data:`MIGRATION_LOCK_KEY` makes exclusive among relays.
"""

from __future__ import annotations

import dataclasses
import re

_MARKER = re.compile(r"\{(seq_column|seq|real|now|next_epoch)\}")
#: ``{iso_epoch:COLUMN}``: seconds since 1970 of an ISO 8601 UTC text column.
_ISO_EPOCH = re.compile(r"\{iso_epoch:([A-Za-z_][A-Za-z0-9_.]*)\}")

#: Key of the PostgreSQL advisory lock that serialises migrations ("tunnel" in ASCII, then 1).
MIGRATION_LOCK_KEY = 0x74756E6E656C0001


_HISTORY_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
    "applied_at {real} NOT NULL)"
)


@dataclasses.dataclass(frozen=True)
class Dialect:
    name: str
    markers: dict[str, str]
    numbered_placeholders: bool

    @property
    def is_postgres(self) -> bool:
        return self.name == "postgresql"

    def migration_lock(self) -> list[str]:
        """Statements that make a migration transaction exclusive among relays (SQLite: the
        transaction's ``BEGIN IMMEDIATE`` already does)."""
        return [f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})"] if self.is_postgres else []

    async def read_version(self, tx) -> int:
        """The schema version of the database ``tx`` is in (0: empty)."""
        if not self.is_postgres:
            return int(await tx.fetchval("PRAGMA user_version"))
        await tx.execute(_HISTORY_TABLE)
        return int(await tx.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_migrations"))

    async def write_version(self, tx, version: int, name: str) -> None:
        if not self.is_postgres:
            await tx.execute(_HISTORY_TABLE)
            await tx.execute(f"PRAGMA user_version = {int(version)}")
        await tx.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, {now})", version, name
        )

    def render(self, sql: str) -> str:
        """``sql`` with the markers replaced and ``?`` turned into this driver's placeholders."""
        text = _MARKER.sub(lambda m: self.markers[m.group(1)], sql)
        text = _ISO_EPOCH.sub(lambda m: self.markers["iso_epoch"].format(m.group(1)), text)
        return number_placeholders(text) if self.numbered_placeholders else text


#: What a ``?`` can hide in: a string literal (``''`` escapes a quote), a quoted identifier, a
#: dollar-quoted string (``$tag$ … $tag$``), a comment; or a ``?`` that is a placeholder.
_SQL_TOKEN = re.compile(r"""
      (?P<string>  [Ee]'(?:[^'\\]|\\.|'')*' | '(?:[^']|'')*' )
    | (?P<ident>   "(?:[^"]|"")*" )
    | (?P<dollar>  (?P<tag>\$(?:[A-Za-z_][A-Za-z0-9_]*)?\$) .*? (?P=tag) )
    | (?P<line>    --[^\n]* )
    | (?P<block>   /\*.*?\*/ )
    | (?P<unclosed> ['"] | \$(?:[A-Za-z_][A-Za-z0-9_]*)?\$ | /\* )
    | (?P<param>   \? )
""", re.VERBOSE | re.DOTALL)


def number_placeholders(sql: str) -> str:
    """``sql`` with each ``?`` placeholder turned into ``$1``, ``$2``… in order; a ``?`` in a
    string literal, a quoted identifier or a comment stays as it is. ``ValueError`` for a
    literal or comment that is never closed (its placeholders could not be told apart)."""
    out: list[str] = []
    position = 0
    count = 0
    for match in _SQL_TOKEN.finditer(sql):
        kind = match.lastgroup
        if kind == "unclosed":
            raise ValueError(f"unterminated literal or comment at offset {match.start()} of {sql!r}")
        if kind != "param":
            continue
        count += 1
        out.append(sql[position:match.start()])
        out.append(f"${count}")
        position = match.end()
    out.append(sql[position:])
    return "".join(out)


SQLITE = Dialect(
    name="sqlite",
    markers={
        "seq_column": "",
        "seq": "rowid",
        "real": "REAL",
        "now": "((julianday('now') - 2440587.5) * 86400.0)",
        "next_epoch": "UPDATE sequences SET value = value + 1 WHERE name = 'link_epoch' RETURNING value",
        "iso_epoch": "CAST(strftime('%s', {}) AS INTEGER)",
    },
    numbered_placeholders=False,
)

POSTGRES = Dialect(
    name="postgresql",
    markers={
        "seq_column": "seq BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,",
        "seq": "seq",
        "real": "DOUBLE PRECISION",
        "now": "(EXTRACT(EPOCH FROM clock_timestamp())::float8)",
        "next_epoch": "SELECT nextval('link_epoch')",
        "iso_epoch": "CAST(EXTRACT(EPOCH FROM {}::timestamptz) AS BIGINT)",
    },
    numbered_placeholders=True,
)
