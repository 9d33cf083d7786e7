"""What an agent may send at ``auth`` and in CONTROL messages (docs/PROTOCOL.md): resource
names, the strings that describe the agent, how many resources and links; anything else is
refused (it would reach logs and terminals)."""

from __future__ import annotations

import re

MAX_RESOURCES_PER_AGENT = 64
#: ``agent.slot`` at auth: which of an agent's links (RELAY_LINKS) this is, 0 to this minus one.
MAX_AGENT_SLOTS = 16
#: Agent-supplied strings accepted at ``auth`` (docs/PROTOCOL.md): anything else is refused.
RESOURCE_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
AGENT_FIELDS = {
    "version": (re.compile(r"[A-Za-z0-9._+-]{1,64}"), "1-64 letters, digits, '.', '_', '+' or '-'"),
    "hostname": (re.compile(r"[A-Za-z0-9._-]{1,253}"), "1-253 letters, digits, '.', '_' or '-'"),
    "instance": (re.compile(r"[A-Za-z0-9_-]{1,64}"), "1-64 letters, digits, '_' or '-'"),
}
#: Optional abilities an agent may announce at ``auth`` (``agent.features``, docs/PROTOCOL.md).
AGENT_FEATURES = frozenset({"worker_address", "enroll"})


def valid(pattern: re.Pattern, value) -> bool:
    """``value`` is a string that ``pattern`` matches whole."""
    return isinstance(value, str) and pattern.fullmatch(value) is not None
