"""``tunnel-agent``: the small process inside a private network that dials out to the relay
and carries each stream the relay opens to the private service configured for it."""
