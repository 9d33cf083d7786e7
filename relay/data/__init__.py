"""Data plane: resource endpoints, the registry of agents and held worker connections,
forwarding between relays (peering), quotas and the relay's metrics."""
