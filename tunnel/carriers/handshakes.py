"""Handshakes in progress on a relay listener, and which one to give up when they are too many.

Both carriers (:mod:`tunnel.carriers.wss` and :mod:`tunnel.carriers.quic`) hold at most
``limits.max_pending_handshakes`` connections between their first packet and authentication.
Refusing every newcomer once that many are pending would let a few hundred idle sockets lock
every real agent out for a whole handshake deadline. Instead a newcomer evicts the oldest
handshake of the source address holding the most slots, if that one has been pending for at
least ``evictable_after`` seconds; otherwise the newcomer is refused. A real agent needs its
slot for milliseconds, idle ones sit oldest in line, and a burst of new connections cannot
flush a handshake younger than ``evictable_after``.

Bookkeeping with time passed in; evictions are logged sparsely (the first, then every
thousandth). :data:`FAILURES` counts the handshakes each listener gave up, by carrier and
reason, for the relay's metrics.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Hashable

log = logging.getLogger("tunnel.carriers.handshakes")

#: With every slot taken, a handshake pending this long (seconds) may be evicted for a newcomer.
EVICTABLE_AFTER = 1.0

#: Handshakes the listeners of this process gave up, per ``(carrier, reason)``; reasons:
#: ``full`` (refused, every slot taken), ``evicted``, ``timeout`` (``handshake_timeout``
#: passed), ``tls`` (TLS handshake failed), ``upgrade`` (WebSocket upgrade refused),
#: ``retry_token`` (a QUIC Retry token that does not validate).
FAILURES: Counter = Counter()


def handshake_failed(carrier: str, reason: str) -> None:
    """Count one handshake given up (see :data:`FAILURES`)."""
    FAILURES[carrier, reason] += 1


class PendingHandshakes:
    """Handshake slots keyed by connection, grouped by source address (insertion-ordered)."""

    __slots__ = ("limit", "evictable_after", "evicted", "_by_source", "_entries")

    def __init__(self, limit: int, evictable_after: float = EVICTABLE_AFTER) -> None:
        self.limit = limit
        self.evictable_after = evictable_after
        self.evicted = 0  #: handshakes given up so far to make room
        self._by_source: dict[Hashable, dict[Hashable, float]] = {}
        self._entries: dict[Hashable, Hashable] = {}  # connection -> source

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, conn: Hashable) -> bool:
        return conn in self._entries

    @property
    def full(self) -> bool:
        return len(self._entries) >= self.limit

    def admit(self, conn: Hashable, source: Hashable, now: float) -> None:
        """Take a slot for ``conn`` (call only when not :attr:`full`, or after an eviction)."""
        self._entries[conn] = source
        self._by_source.setdefault(source, {})[conn] = now

    def make_room(self, now: float, evict: Callable[[Hashable], None]) -> bool:
        """True if a slot is free, after handing a stale handshake to ``evict`` (its slot
        already freed) if need be; False if the newcomer must be refused."""
        if not self.full:
            return True
        victim = self.pick_victim(now)
        if victim is None:
            return False
        if self.evicted == 1 or self.evicted % 1000 == 0:
            log.warning("%d handshakes pending: evicting the oldest from %s (%d evicted so far)",
                        len(self), getattr(victim, "peer_address", None), self.evicted)
        evict(victim)
        return True

    def forget(self, conn: Hashable) -> bool:
        """Free ``conn``'s slot; False if it held none."""
        source = self._entries.pop(conn, _MISSING)
        if source is _MISSING:
            return False
        group = self._by_source[source]
        del group[conn]
        if not group:
            del self._by_source[source]
        return True

    def pick_victim(self, now: float) -> Hashable | None:
        """The handshake to evict for a newcomer, its slot already freed; None if every
        pending handshake is younger than ``evictable_after`` (refuse the newcomer then)."""
        if not self._by_source:
            return None
        group = max(self._by_source.values(), key=len)
        victim, since = next(iter(group.items()))
        if now - since < self.evictable_after:
            return None
        self.forget(victim)
        self.evicted += 1
        return victim


_MISSING = object()
