"""State: the relay's records (customers, resources, tokens, agent links) over the store
(SQLite or PostgreSQL), cluster membership, and the PKI files of the state directory."""
