"""The relay's state database: one async interface, two back ends, one schema.

::

    relay.state.RelayState          the queries (customers, resources, tokens, relays, links)
        └── Database                database.py: fetch/execute/transaction/subscribe
            ├── SqliteDatabase      sqlite.py: <state-dir>/relay.db on a worker thread
            └── PostgresDatabase    postgres.py: asyncpg pool + LISTEN, reconnects by itself
    dialect.py      every SQLite/PostgreSQL difference
    migrations.py   the schema as ordered, versioned steps, run at start under a lock
    settings.py     timings (RELAY_DB_*, RELAY_HEARTBEAT_INTERVAL, ...)
    errors.py       StoreError > StoreUnavailable, Conflict, SchemaTooNew

See docs/CLUSTER.md.
"""
