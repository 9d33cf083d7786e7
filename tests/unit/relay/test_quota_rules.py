"""relay.data.quotas: registrations per minute and the relay's descriptor budget, on fake time."""

from __future__ import annotations

import pytest

from relay.data.quotas import FULL_CODE, QUOTA_CODE, Descriptors, QuotaExceeded, RegistrationRate
from relay.settings import RelaySettings


def test_registration_rate_allows_a_minutes_burst_then_the_rate():
    now = [0.0]
    rate = RegistrationRate(60, clock=lambda: now[0])
    for _ in range(60):
        rate.charge("cus_a")
    with pytest.raises(QuotaExceeded) as exc:
        rate.charge("cus_a")
    assert exc.value.code == QUOTA_CODE and not exc.value.fatal
    assert "60 registrations per minute" in str(exc.value)
    rate.charge("cus_b")  # another customer: its own bucket
    now[0] = 1.0  # one more per second
    rate.charge("cus_a")
    with pytest.raises(QuotaExceeded):
        rate.charge("cus_a")


def _try_take(d: Descriptors, customer_id: str) -> bool:
    try:
        d.check(customer_id)
    except QuotaExceeded:
        return False
    d.take(customer_id)
    return True


def test_descriptors_budget_share_and_reserve():
    d = Descriptors(1024, RelaySettings(fd_reserve=512, customer_fd_share=0.5))
    assert (d.budget, d.hard_budget, d.share) == (512, 768, 256)
    for _ in range(256):
        assert _try_take(d, "cus_a")
    assert not _try_take(d, "cus_a")  # over its share
    with pytest.raises(QuotaExceeded, match="over its share of 256"):
        d.check_link("cus_a")
    for _ in range(256):
        assert _try_take(d, "cus_b")
    assert d.used == d.budget  # spent by two customers at their share
    # A third customer below its fair part (512 / 3) goes on into half the reserve...
    for _ in range(170):
        assert _try_take(d, "cus_c")
    assert not _try_take(d, "cus_c")  # ... up to that fair part
    d.take(None, 86)  # links not yet authenticated
    assert d.used == d.hard_budget
    with pytest.raises(QuotaExceeded) as exc:
        d.check("cus_d")  # the rest of the reserve is not for customers
    assert exc.value.code == FULL_CODE and "512 kept in reserve" in str(exc.value)
    d.give("cus_a", 256)
    assert d.of("cus_a") == 0 and _try_take(d, "cus_d")


def test_a_small_limit_keeps_half_free():
    d = Descriptors(256, RelaySettings(fd_reserve=512))
    assert d.budget == 128 and d.share == 64


def test_the_open_files_line_says_raised_only_when_it_was():
    from relay.data.quotas import Descriptors
    from relay.serve import open_files_line
    from tunnel.core.limits import Limits

    same = open_files_line(20000, 20000, Descriptors(20000, RelaySettings()))
    assert same.startswith("open files: limit 20000; ") and "raised" not in same
    raised = open_files_line(1024, 20000, Descriptors(20000, RelaySettings()))
    assert raised.startswith("open files: limit 20000 (raised from 1024); ")
