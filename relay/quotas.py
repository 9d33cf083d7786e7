"""Per-customer quotas and the relay's open-file budget, so that one customer can never
exhaust the relay for another (docs/LIMITS.md, "Quotas").

- :class:`RegistrationRate`: ``auth`` messages with a valid token, per customer and minute
  (a token bucket holding one minute's worth).
- :class:`Descriptors`: the relay raises its open-file soft limit to the hard limit at start
  (:func:`raise_nofile_limit`) and keeps ``fd_reserve`` descriptors free for the admin API,
  the database and handshakes in progress. What it counts (agent links over TCP, resource
  endpoints and the connections to them) may use the rest, and one customer at most
  ``customer_fd_share`` of it: beyond, new agent links are refused with a clear error and
  the customer's endpoints reset new connections at once, while everyone else carries on.

Over quota is an :class:`QuotaExceeded` (an ``AuthError``), sent to that agent alone as a
CONTROL ``error``; the agent retries later.
"""

from __future__ import annotations

import logging
import resource
import time

from tunnel.core.limits import Limits
from tunnel.wire.errors import AuthError

log = logging.getLogger("relay.quotas")

#: Error codes of the CONTROL ``error`` message for these refusals (the agent retries).
QUOTA_CODE = "quota_exceeded"
FULL_CODE = "relay_full"


class QuotaExceeded(AuthError):
    """A customer is over one of its quotas, or the relay is out of descriptors."""

    def __init__(self, message: str, code: str = QUOTA_CODE) -> None:
        super().__init__(message, code=code, fatal=False)


class RegistrationRate:
    """``max_registrations_per_minute`` per customer, as a token bucket refilled continuously."""

    def __init__(self, per_minute: int, clock=time.monotonic) -> None:
        self.capacity = float(per_minute)
        self.per_second = per_minute / 60.0
        self._clock = clock
        self._buckets: dict[str, list[float]] = {}  # customer -> [tokens, at]

    def charge(self, customer_id: str) -> None:
        """Count one registration; raise :class:`QuotaExceeded` beyond the rate."""
        now = self._clock()
        bucket = self._buckets.get(customer_id)
        if bucket is None:
            bucket = self._buckets[customer_id] = [self.capacity, now]
        tokens = min(self.capacity, bucket[0] + (now - bucket[1]) * self.per_second)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            raise QuotaExceeded(f"customer {customer_id} is over its quota of {int(self.capacity)} registrations "
                                "per minute (TUNNEL_MAX_REGISTRATIONS_PER_MINUTE); retry later")
        bucket[0] = tokens - 1.0
        if len(self._buckets) > 65536:  # forget full buckets: they hold nothing
            for key in [k for k, (t, at) in self._buckets.items()
                        if t + (now - at) * self.per_second >= self.capacity]:
                del self._buckets[key]


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the open-file soft limit to the hard limit; return ``(before, after)``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
            return soft, soft
        return soft, target
    return soft, soft


class Descriptors:
    """The descriptors the relay spends on customers' behalf, against its budget.

    ``budget`` is the open-file limit less ``fd_reserve`` (at least half the limit);
    ``share`` is what one customer may hold. Unattributed use (an agent link before it
    authenticated) counts against the budget only.
    """

    def __init__(self, open_files: int, limits: Limits) -> None:
        reserve = limits.fd_reserve
        if open_files - reserve < open_files // 2:
            log.warning("open-file limit %d is low for a reserve of %d (TUNNEL_FD_RESERVE): keeping half of it free",
                        open_files, reserve)
            reserve = open_files - open_files // 2
        self.open_files = open_files
        self.budget = open_files - reserve
        self.share = max(1, int(self.budget * limits.customer_fd_share))
        self.used = 0
        self._by_customer: dict[str, int] = {}

    def of(self, customer_id: str) -> int:
        return self._by_customer.get(customer_id, 0)

    def check(self, customer_id: str | None, n: int = 1) -> None:
        """Raise :class:`QuotaExceeded` if ``n`` more descriptors for ``customer_id`` (None:
        not attributed) would pass the relay's budget or the customer's share."""
        if self.used + n > self.budget:
            raise self._full()
        if customer_id is not None and self.of(customer_id) + n > self.share:
            raise self._over_share(customer_id)

    def check_link(self, customer_id: str) -> None:
        """An agent link (its descriptor counted, not yet attributed) is about to become
        ``customer_id``'s: refuse it beyond the budget or the customer's share."""
        if self.used > self.budget:
            raise self._full()
        if self.of(customer_id) + 1 > self.share:
            raise self._over_share(customer_id)

    def _full(self) -> QuotaExceeded:
        return QuotaExceeded(f"the relay is out of file descriptors ({self.used} of {self.budget} in use, "
                             f"{self.open_files - self.budget} kept in reserve); retry later", code=FULL_CODE)

    def _over_share(self, customer_id: str) -> QuotaExceeded:
        return QuotaExceeded(f"customer {customer_id} is over its share of {self.share} relay file descriptors "
                             "(agent links, endpoints and their connections; TUNNEL_CUSTOMER_FD_SHARE)")

    def try_take(self, customer_id: str | None) -> bool:
        """Take one descriptor if :meth:`check` allows it."""
        try:
            self.check(customer_id)
        except QuotaExceeded:
            return False
        self.take(customer_id)
        return True

    def take(self, customer_id: str | None, n: int = 1) -> None:
        """Count ``n`` descriptors already open (no check)."""
        self.used += n
        if customer_id is not None:
            self._by_customer[customer_id] = self.of(customer_id) + n

    def give(self, customer_id: str | None, n: int = 1) -> None:
        self.used -= n
        if customer_id is not None:
            left = self.of(customer_id) - n
            if left > 0:
                self._by_customer[customer_id] = left
            else:
                self._by_customer.pop(customer_id, None)

    def attribute(self, customer_id: str, n: int = 1) -> None:
        """Unattributed descriptors (an agent link) now belong to ``customer_id``."""
        self._by_customer[customer_id] = self.of(customer_id) + n
