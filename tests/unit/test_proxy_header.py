"""PROXY protocol v2 headers and the worker address of OPEN metadata (tunnel.bridge.proxy_protocol)."""

import ipaddress

from tunnel.bridge.proxy_protocol import format_worker, parse_metadata, proxy_v2_header

SIG = bytes.fromhex("0d0a0d0a000d0a515549540a")


def test_ipv4_header_bytes():
    name, address = parse_metadata(b"orders-db\x00" + format_worker(("192.0.2.7", 51234), ("10.0.0.1", 25432)))
    assert name == "orders-db"
    assert proxy_v2_header(address) == SIG + bytes.fromhex("21 11 000c c0000207 0a000001 c822 6358")


def test_ipv6_and_mixed_families():
    _, address = parse_metadata(b"db\x002001:db8::1 443 ::1 80")
    assert proxy_v2_header(address) == (SIG + bytes.fromhex("21 21 0024") + ipaddress.ip_address("2001:db8::1").packed
                                        + ipaddress.ip_address("::1").packed + bytes.fromhex("01bb 0050"))
    _, mixed = parse_metadata(b"db\x00192.0.2.7 1 ::1 2")
    assert proxy_v2_header(mixed)[12:16] == bytes.fromhex("2121 0024")
    assert proxy_v2_header(mixed)[16:32] == ipaddress.ip_address("::ffff:192.0.2.7").packed


def test_no_address_is_a_local_header():
    assert parse_metadata(b"db") == ("db", None)
    assert proxy_v2_header(None) == SIG + bytes.fromhex("20 00 0000")


def test_a_malformed_address_field_names_no_resource():
    for field in (b"", b"1.2.3.4 1 5.6.7.8", b"1.2.3.4 1 5.6.7.8 70000", b"x y z w", b"1.2.3.4 1 5.6.7.8 2 9",
                  "\u00e9".encode()):
        name, address = parse_metadata(b"db\x00" + field)
        assert address is None and name != "db"
