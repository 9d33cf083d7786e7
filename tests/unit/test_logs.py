"""tunnel.ops.logs: control characters escaped, secrets redacted, recurring lines throttled."""

from __future__ import annotations

import logging

from tunnel.ops import logs


def test_escape_keeps_text_and_escapes_control_characters():
    assert logs.escape("plain é 日本") == "plain é 日本"
    assert logs.escape("a\nb\r\tc") == "a\\nb\\r\\tc"
    assert logs.escape("\x1b[31m\x9b\u202e\U000e0041") == "\\x1b[31m\\x9b\\u202e\\U000e0041"


def test_plain_lines_cannot_be_forged():
    record = logging.LogRecord("relay", logging.INFO, __file__, 1, "agent version %s", ("1\n2031 INFO forged",), None)
    line = logs._PlainFormatter().format(record)
    assert "\n" not in line and line.endswith("agent version 1\\n2031 INFO forged")


def test_throttled_logs_once_per_interval_and_counts_the_rest(caplog):
    now = [0.0]
    throttled = logs.Throttled(logging.getLogger("t"), 60.0, clock=lambda: now[0])
    caplog.set_level(logging.INFO)
    assert throttled.log("k", logging.WARNING, "over quota %s", "a")
    for _ in range(5):
        assert not throttled.log("k", logging.WARNING, "over quota %s", "a")
    assert throttled.log("other", logging.WARNING, "another")
    now[0] = 61.0
    assert throttled.log("k", logging.WARNING, "over quota %s", "a")
    assert [r.getMessage() for r in caplog.records] == [
        "over quota a", "another", "over quota a (5 more in the last 61 s)"]
