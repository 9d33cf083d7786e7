"""The relay's durable state: one SQLite file ``<state-dir>/relay.db`` (WAL).

Tables (schema version in ``PRAGMA user_version``):

- ``customers``  ``id`` (``cus_`` + 16 base32 chars), ``name``, ``created_at``
- ``resources``  ``id`` (``res_…``), ``customer_id``, ``name``, ``port``, ``generation``,
  ``created_at``; one name per customer, one port per resource (kept across restarts)
- ``tokens``     every registration JWT issued (audit): ``jti``, ``customer_id``,
  ``resource_id``, ``generation``, ``org_only``, ``issued_at``, ``expires_at``

Migrations, applied in order: 1 creates the tables above; 2 adds
``resources.last_served_at`` (Unix seconds an agent last served the resource, NULL when
never: then ``created_at`` counts), which drives the expiry of resources no agent serves.

The built-in organisation customer ``cus_org`` (name ``organization``) is created on first use
and owns the resources registered with ``--org-only`` tokens.

Also the small file helpers every relay module uses: :func:`ensure_state_dir` (mode 0700) and
:func:`write_private` (atomic, mode 0600), and :func:`state_write_failure`, which tells a full
or read-only state directory apart from a bug.
"""

from __future__ import annotations

import base64
import datetime as _dt
import errno
import os
import random
import secrets
import socket
import sqlite3
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

ORG_CUSTOMER_ID = "cus_org"
ORG_CUSTOMER_NAME = "organization"
SCHEMA_VERSION = 2
DEFAULT_PORT_RANGE = (20000, 29999)
MAX_NAME_LENGTH = 200

_SCHEMA_V1 = """
CREATE TABLE customers (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    created_at  TEXT NOT NULL
);
CREATE TABLE resources (
    id          TEXT PRIMARY KEY,
    customer_id TEXT NOT NULL REFERENCES customers(id),
    name        TEXT NOT NULL,
    port        INTEGER NOT NULL,
    generation  INTEGER NOT NULL DEFAULT 0,
    created_at  TEXT NOT NULL,
    UNIQUE (customer_id, name),
    UNIQUE (port)
);
CREATE TABLE tokens (
    jti         TEXT PRIMARY KEY,
    customer_id TEXT NOT NULL,
    resource_id TEXT,
    generation  INTEGER NOT NULL,
    org_only    INTEGER NOT NULL,
    issued_at   INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL
);
CREATE INDEX tokens_by_resource ON tokens(resource_id);
"""

# {now} is the migration time: resources that exist already get a full idle period.
_SCHEMA_V2 = """
ALTER TABLE resources ADD COLUMN last_served_at INTEGER;
UPDATE resources SET last_served_at = {now};
"""

_MIGRATIONS = {1: _SCHEMA_V1, 2: _SCHEMA_V2}


# --------------------------------------------------------------------------- files


def ensure_state_dir(path: str | os.PathLike) -> Path:
    """Create the state directory (mode 0700) if needed; tighten it when others can read it."""
    directory = Path(path)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = directory.stat()
    if st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(directory, 0o700)
    return directory


def write_private(path: str | os.PathLike, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` atomically (temp file + rename) with ``mode`` from the first byte on."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def state_write_failure(exc: BaseException) -> str | None:
    """A one-line description when ``exc`` is the state directory refusing a write (full,
    read-only, I/O error); None for anything else (a bug, worth its traceback)."""
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


# --------------------------------------------------------------------------- ids, names


def new_id(prefix: str) -> str:
    """``prefix`` + ``_`` + 16 lower-case base32 characters (80 random bits)."""
    return prefix + "_" + base64.b32encode(secrets.token_bytes(10)).decode("ascii").lower()


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def validate_name(name: object, what: str = "name") -> str:
    """A display name: a non-empty string of at most 200 printable characters."""
    if not isinstance(name, str):
        raise ValueError(f"{what} must be a string")
    if not name or not name.strip():
        raise ValueError(f"{what} must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"{what} must be at most {MAX_NAME_LENGTH} characters")
    if not name.isprintable():
        raise ValueError(f"{what} must not contain control characters")
    return name


# --------------------------------------------------------------------------- ports


def allocate_port(host: str, taken: set[int], port_range: tuple[int, int] = DEFAULT_PORT_RANGE) -> int:
    """A TCP port in ``port_range`` (inclusive) that is not in ``taken`` and can be bound on
    ``host`` right now (with SO_REUSEADDR, as asyncio's servers bind). The scan starts at a
    random port. Raise ``RuntimeError`` when none is free."""
    low, high = port_range
    if not 0 < low <= high <= 65535:
        raise ValueError(f"bad port range {port_range!r}")
    infos = socket.getaddrinfo(host or None, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, sockaddr = infos[0]
    span = high - low + 1
    start = random.randrange(span)
    for i in range(span):
        port = low + (start + i) % span
        if port in taken:
            continue
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((sockaddr[0], port) + tuple(sockaddr[2:]))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free TCP port in {low}-{high} on {host}")


# --------------------------------------------------------------------------- the database


class RelayState:
    """Customers, resources and issued tokens in SQLite. Meant for the event-loop thread; every
    call is a short transaction (a lock makes calls from another thread safe, too)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.state_dir = self.path.parent
        ensure_state_dir(self.state_dir)
        if not self.path.exists():
            # Create the file with 0600 before SQLite opens it.
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=5.0)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    @classmethod
    def open_dir(cls, state_dir: str | os.PathLike) -> "RelayState":
        from . import DATABASE_FILE

        return cls(Path(state_dir) / DATABASE_FILE)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def ping(self) -> None:
        """Raise unless the database answers a query (the relay's ``/ready`` check; a store
        may make this a coroutine, the caller awaits it then)."""
        with self._lock:
            self._db.execute("SELECT 1 FROM customers LIMIT 1").fetchall()

    def __enter__(self) -> "RelayState":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _migrate(self) -> None:
        with self._lock:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path} has schema version {version}, newer than this relay's {SCHEMA_VERSION}"
                )
            for step in range(version + 1, SCHEMA_VERSION + 1):
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    # Another process may have migrated meanwhile.
                    if self._db.execute("PRAGMA user_version").fetchone()[0] < step:
                        script = _MIGRATIONS[step].replace("{now}", str(int(time.time())))
                        for statement in script.split(";"):
                            if statement.strip():
                                self._db.execute(statement)
                        self._db.execute(f"PRAGMA user_version = {step}")
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise

    # ---- customers

    def create_customer(self, name: str) -> dict:
        name = validate_name(name, "customer name")
        customer = {"id": new_id("cus"), "name": name, "created_at": _now_iso()}
        with self._lock:
            self._db.execute(
                "INSERT INTO customers (id, name, created_at) VALUES (:id, :name, :created_at)", customer
            )
        return customer

    def list_customers(self) -> list[dict]:
        with self._lock:
            rows = self._db.execute("SELECT id, name, created_at FROM customers ORDER BY rowid")
            return [dict(row) for row in rows]

    def get_customer(self, customer_id: str) -> dict | None:
        """The customer, or ``None``. ``cus_org`` is created on first request."""
        if customer_id == ORG_CUSTOMER_ID:
            return self.org_customer()
        with self._lock:
            row = self._db.execute(
                "SELECT id, name, created_at FROM customers WHERE id = ?", (customer_id,)
            ).fetchone()
        return dict(row) if row else None

    def org_customer(self) -> dict:
        """The built-in organisation customer, created lazily."""
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO customers (id, name, created_at) VALUES (?, ?, ?)",
                (ORG_CUSTOMER_ID, ORG_CUSTOMER_NAME, _now_iso()),
            )
            row = self._db.execute(
                "SELECT id, name, created_at FROM customers WHERE id = ?", (ORG_CUSTOMER_ID,)
            ).fetchone()
        return dict(row)

    # ---- resources

    _RESOURCE_COLUMNS = "id, customer_id, name, port, generation, created_at"

    def get_resource(self, resource_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {self._RESOURCE_COLUMNS} FROM resources WHERE id = ?", (resource_id,)
            ).fetchone()
        return dict(row) if row else None

    def find_resource(self, customer_id: str, name: str) -> dict | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {self._RESOURCE_COLUMNS} FROM resources WHERE customer_id = ? AND name = ?",
                (customer_id, name),
            ).fetchone()
        return dict(row) if row else None

    def list_resources(self, customer_id: str | None = None) -> list[dict]:
        with self._lock:
            if customer_id is None:
                rows = self._db.execute(
                    f"SELECT {self._RESOURCE_COLUMNS} FROM resources ORDER BY rowid"
                )
            else:
                rows = self._db.execute(
                    f"SELECT {self._RESOURCE_COLUMNS} FROM resources WHERE customer_id = ? "
                    "ORDER BY rowid",
                    (customer_id,),
                )
            return [dict(row) for row in rows]

    def taken_ports(self) -> set[int]:
        with self._lock:
            return {row[0] for row in self._db.execute("SELECT port FROM resources")}

    def get_or_create_resource(
        self, customer_id: str, name: str, allocate_port: Callable[[set[int]], int]
    ) -> dict:
        """The customer's resource called ``name``; created with a port from
        ``allocate_port(taken_ports)`` when it does not exist. Raise ``KeyError`` for an
        unknown customer, ``ValueError`` for a bad name."""
        name = validate_name(name, "resource name")
        existing = self.find_resource(customer_id, name)
        if existing is not None:
            return existing
        if self.get_customer(customer_id) is None:
            raise KeyError(f"unknown customer {customer_id}")
        with self._lock:
            taken = self.taken_ports()
            for _ in range(16):
                port = int(allocate_port(set(taken)))
                if port in taken or not 0 < port <= 65535:
                    raise RuntimeError(f"port allocator returned a taken or invalid port {port}")
                resource = {
                    "id": new_id("res"),
                    "customer_id": customer_id,
                    "name": name,
                    "port": port,
                    "generation": 0,
                    "created_at": _now_iso(),
                }
                try:
                    self._db.execute(
                        "INSERT INTO resources (id, customer_id, name, port, generation, created_at) "
                        "VALUES (:id, :customer_id, :name, :port, :generation, :created_at)",
                        resource,
                    )
                    return resource
                except sqlite3.IntegrityError:
                    # Another writer (another process on the same file) won the name or port.
                    existing = self.find_resource(customer_id, name)
                    if existing is not None:
                        return existing
                    taken = self.taken_ports()
            raise RuntimeError("could not allocate a port for the resource")

    def delete_resource(self, resource_id: str) -> bool:
        """Delete the resource; its tokens stay in the audit table. True when it existed."""
        with self._lock:
            cursor = self._db.execute("DELETE FROM resources WHERE id = ?", (resource_id,))
            return cursor.rowcount > 0

    def rotate_resource(self, resource_id: str) -> int:
        """Increment the resource's generation (revoking older tokens); return the new one.
        Raise ``KeyError`` for an unknown resource."""
        with self._lock:
            row = self._db.execute(
                "UPDATE resources SET generation = generation + 1 WHERE id = ? RETURNING generation",
                (resource_id,),
            ).fetchone()
        if row is None:
            raise KeyError(f"unknown resource {resource_id}")
        return int(row[0])

    def count_resources(self, customer_id: str) -> int:
        """How many resources ``customer_id`` has (its quota counts them)."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM resources WHERE customer_id = ?",
                                    (customer_id,)).fetchone()[0]

    def mark_served(self, resource_ids, at: int) -> None:
        """Record that agents served ``resource_ids`` at ``at`` (Unix seconds)."""
        ids = list(resource_ids)
        with self._lock:
            self._db.executemany("UPDATE resources SET last_served_at = ? WHERE id = ?",
                                 [(int(at), rid) for rid in ids])

    def idle_resources(self, served_before: int) -> list[dict]:
        """Resources no agent has served since ``served_before`` (Unix seconds; never served:
        since created) and that no token names by id (those are the operator's to delete)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {self._RESOURCE_COLUMNS} FROM resources r "
                "WHERE COALESCE(r.last_served_at, CAST(strftime('%s', r.created_at) AS INTEGER)) < ? "
                "AND NOT EXISTS (SELECT 1 FROM tokens t WHERE t.resource_id = r.id) ORDER BY rowid",
                (int(served_before),),
            )
            return [dict(row) for row in rows]

    # ---- tokens (audit)

    def record_token(
        self,
        jti: str,
        customer_id: str,
        resource_id: str | None,
        generation: int,
        org_only: bool,
        issued_at: int,
        expires_at: int,
    ) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO tokens (jti, customer_id, resource_id, generation, org_only, issued_at, "
                "expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (jti, customer_id, resource_id, int(generation), int(bool(org_only)), int(issued_at), int(expires_at)),
            )

    def list_tokens(self, resource_id: str | None = None) -> list[dict]:
        with self._lock:
            if resource_id is None:
                rows = self._db.execute("SELECT * FROM tokens ORDER BY issued_at, jti")
            else:
                rows = self._db.execute(
                    "SELECT * FROM tokens WHERE resource_id = ? ORDER BY issued_at, jti", (resource_id,)
                )
            result = []
            for row in rows:
                item = dict(row)
                item["org_only"] = bool(item["org_only"])
                result.append(item)
            return result
