"""Source rules of resource endpoints (relay.state.access)."""

import pytest

from relay.state.access import allowed, format_cidrs, parse_cidrs, stored_cidrs


def test_lists_parse_to_networks_and_back():
    assert format_cidrs(parse_cidrs(" 10.1.2.3/8, 192.0.2.7 ,2001:db8::/32")) == "10.0.0.0/8,192.0.2.7/32,2001:db8::/32"
    assert format_cidrs(parse_cidrs(["::1"])) == "::1/128"
    assert stored_cidrs(None) is None and format_cidrs(None) is None


@pytest.mark.parametrize("value, message", [
    ("", "at least one CIDR"), ([], "at least one CIDR"), ("10.0.0.0/33", "not a CIDR"), ("host.example", "not a CIDR"),
    (7, "list of CIDR strings"), (["10.0.0.0/8", 1], "list of CIDR strings"), (",".join(["10.0.0.1"] * 65), "at most 64"),
])
def test_bad_lists_are_refused_with_the_reason(value, message):
    with pytest.raises(ValueError, match=message):
        parse_cidrs(value)


def test_sources_inside_and_outside():
    rule = parse_cidrs("10.0.0.0/8,2001:db8::/32")
    assert allowed(rule, "10.9.8.7") and allowed(rule, "::ffff:10.9.8.7") and allowed(rule, "2001:db8::1%eth0")
    assert not allowed(rule, "11.0.0.1") and not allowed(rule, "2001:db9::1") and not allowed(rule, "")
    assert allowed(None, "203.0.113.9")  # no rule: any source
    assert not allowed((), "10.0.0.1")  # an unusable stored rule: nobody
