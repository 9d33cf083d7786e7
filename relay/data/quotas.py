"""Per-customer quotas and the relay's open-file budget, so that one customer can never
exhaust the relay for another (docs/LIMITS.md, "Quotas").

- :class:`RegistrationRate`: ``auth`` messages with a valid token, per customer and minute
  (a token bucket holding one minute's worth, :class:`PerCustomerRate`, which also bounds
  what ``target_health`` reports can make the relay do and log).
- :class:`Descriptors`: the relay raises its open-file soft limit to the hard limit at start
  (:func:`raise_nofile_limit`) and keeps ``fd_reserve`` descriptors free for the admin API,
  the database and handshakes in progress. What it counts (agent links over TCP, resource
  endpoints and the connections to them) may use the rest, and one customer at most
  ``customer_fd_share`` of it: beyond, its new agent links are refused with a clear error and
  its endpoints reset new connections at once, while everyone else carries on (customers
  below their fair part may use half the reserve when the rest is spent).

Over quota is an :class:`QuotaExceeded` (an ``AuthError``), sent to that agent alone as a
CONTROL ``error``; the agent retries later.
"""

from __future__ import annotations

import logging
import resource
import time

from tunnel.wire.errors import AuthError

from relay.settings import RelaySettings

log = logging.getLogger("relay.quotas")

#: Error codes of the CONTROL ``error`` message for these refusals (the agent retries).
QUOTA_CODE = "quota_exceeded"
FULL_CODE = "relay_full"


class QuotaExceeded(AuthError):
    """A customer is over one of its quotas, or the relay is out of descriptors. ``limit``
    names the :class:`relay.settings.RelaySettings` field that was hit and ``customer_id`` whose use hit it (None:
    not known yet), for the metrics."""

    def __init__(self, message: str, code: str = QUOTA_CODE, *, limit: str, customer_id: str | None) -> None:
        super().__init__(message, code=code, fatal=False)
        self.limit = limit
        self.customer_id = customer_id


class PerCustomerRate:
    """``per_minute`` per customer, as a token bucket holding one minute's worth, refilled
    continuously."""

    def __init__(self, per_minute: int, clock=time.monotonic) -> None:
        self.capacity = float(per_minute)
        self.per_second = per_minute / 60.0
        self._clock = clock
        self._buckets: dict[str, list[float]] = {}  # customer -> [tokens, at]

    def take(self, customer_id: str, n: int = 1) -> int:
        """Take up to ``n`` tokens of ``customer_id``'s bucket; return how many it had."""
        now = self._clock()
        bucket = self._buckets.get(customer_id)
        if bucket is None:
            bucket = self._buckets[customer_id] = [self.capacity, now]
        tokens = min(self.capacity, bucket[0] + (now - bucket[1]) * self.per_second)
        bucket[1] = now
        taken = min(n, int(tokens))
        bucket[0] = tokens - taken
        if len(self._buckets) > 65536:  # forget full buckets: they hold nothing
            for key in [k for k, (t, at) in self._buckets.items()
                        if t + (now - at) * self.per_second >= self.capacity]:
                del self._buckets[key]
        return taken


class RegistrationRate(PerCustomerRate):
    """``max_registrations_per_minute`` per customer."""

    def charge(self, customer_id: str) -> None:
        """Count one registration; raise :class:`QuotaExceeded` beyond the rate."""
        if not self.take(customer_id):
            raise QuotaExceeded(f"customer {customer_id} is over its quota of {int(self.capacity)} registrations "
                                "per minute (TUNNEL_MAX_REGISTRATIONS_PER_MINUTE); retry later",
                                limit="max_registrations_per_minute", customer_id=customer_id)


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

    ``budget`` is the open-file limit less ``fd_reserve`` (at least half the limit), and
    ``share`` what one customer may hold of it. Once the budget is spent, a customer still
    below its fair part of it (the budget over the customers holding descriptors) may go on
    into the first half of the reserve, so that customers who hit their share together do
    not shut out the others; beyond that (``hard_budget``) new links are refused with
    ``relay_full``. The second half stays for the admin API, the database and handshakes.
    Unattributed use (an agent link before it authenticated) counts against the total only.
    """

    def __init__(self, open_files: int, settings: RelaySettings) -> None:
        reserve = settings.fd_reserve
        if open_files - reserve < open_files // 2:
            log.warning("open-file limit %d is low for a reserve of %d (TUNNEL_FD_RESERVE): keeping half of it free",
                        open_files, reserve)
            reserve = open_files - open_files // 2
        self.open_files = open_files
        self.budget = open_files - reserve
        self.hard_budget = open_files - reserve // 2
        self.share = max(1, int(self.budget * settings.customer_fd_share))
        self.used = 0
        self._by_customer: dict[str, int] = {}

    def of(self, customer_id: str) -> int:
        return self._by_customer.get(customer_id, 0)

    def check(self, customer_id: str | None, n: int = 1) -> None:
        """Raise :class:`QuotaExceeded` if ``n`` more descriptors for ``customer_id`` (None:
        not attributed) would pass the customer's share or the relay's budget (see the class
        docstring)."""
        self._check(customer_id, self.used + n, n)

    def check_link(self, customer_id: str) -> None:
        """An agent link (its descriptor counted, not yet attributed) is about to become
        ``customer_id``'s: refuse it beyond the customer's share or the relay's budget."""
        self._check(customer_id, self.used, 1)

    def _check(self, customer_id: str | None, total: int, n: int) -> None:
        if customer_id is None:
            if total > self.budget:
                raise self._full(None)
            return
        mine = self.of(customer_id) + n
        if mine > self.share:
            raise self._over_share(customer_id)
        if total <= self.budget:
            return
        holders = len(self._by_customer) + (customer_id not in self._by_customer)
        if total > self.hard_budget or mine > self.budget // holders:
            raise self._full(customer_id)

    def _full(self, customer_id: str | None) -> QuotaExceeded:
        return QuotaExceeded(f"the relay is short of file descriptors ({self.used} in use, {self.budget} for "
                             f"customers, {self.open_files - self.budget} kept in reserve); retry later",
                             code=FULL_CODE, limit="fd_reserve", customer_id=customer_id)

    def _over_share(self, customer_id: str) -> QuotaExceeded:
        return QuotaExceeded(f"customer {customer_id} is over its share of {self.share} relay file descriptors "
                             "(agent links, endpoints and their connections; TUNNEL_CUSTOMER_FD_SHARE)",
                             limit="customer_fd_share", customer_id=customer_id)

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
