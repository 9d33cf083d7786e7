"""The Prometheus text format we write (tunnel.ops.exposition): lines, escaping, histograms.
The e2e suite lints real relay and agent output with promtool and scrapes it with Prometheus."""

import math

import pytest

from tunnel.ops.exposition import Family, Histogram, process_families, render
from tunnel.ops.metrics_http import parse_listen


def test_counter_and_gauge_lines():
    text = render([
        Family("x_total", "counter", "Things.", ("a", "b")).add(("1", "2"), 3).add(("4", "5"), 6),
        Family("y", "gauge", "A level.").add((), 0.25),
    ]).decode()
    assert text == ('# HELP x_total Things.\n# TYPE x_total counter\n'
                    'x_total{a="1",b="2"} 3\nx_total{a="4",b="5"} 6\n'
                    '# HELP y A level.\n# TYPE y gauge\ny 0.25\n')


def test_label_values_and_help_are_escaped():
    text = render([Family("z", "gauge", "back\\slash\nnewline", ("v",)).add(('a"b\\c\nd',), 1)]).decode()
    assert "# HELP z back\\\\slash\\nnewline\n" in text
    assert 'z{v="a\\"b\\\\c\\nd"} 1\n' in text
    assert text.count("\n") == 3  # no value can add a line


def test_special_values():
    text = render([Family("w", "gauge", "w", ("k",)).add(("a",), math.inf).add(("b",), -math.inf)
                   .add(("c",), math.nan)]).decode()
    assert 'w{k="a"} +Inf' in text and 'w{k="b"} -Inf' in text and 'w{k="c"} NaN' in text


def test_histogram_buckets_are_cumulative_and_inclusive():
    h = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 1.0, 7.0):
        h.observe(value)
    text = render([Family("rtt_seconds", "histogram", "Round trips.", ("t",)).add_histogram(("wss",), h)]).decode()
    assert 'rtt_seconds_bucket{t="wss",le="0.1"} 2\n' in text  # 0.1 itself is "less or equal"
    assert 'rtt_seconds_bucket{t="wss",le="1.0"} 4\n' in text
    assert 'rtt_seconds_bucket{t="wss",le="+Inf"} 5\n' in text
    assert 'rtt_seconds_count{t="wss"} 5\n' in text
    assert 'rtt_seconds_sum{t="wss"} 8.65\n' in text


def test_mistakes_are_refused():
    with pytest.raises(ValueError, match="label values"):
        Family("x", "gauge", "x", ("a",)).add((), 1)
    with pytest.raises(ValueError, match="unknown metric type"):
        Family("x", "summary", "x")
    with pytest.raises(ValueError, match="increasing"):
        Histogram((1.0, 0.5))


def test_process_families():
    names = {f.name for f in process_families()}
    assert {"process_cpu_seconds_total", "process_start_time_seconds"} <= names
    assert "process_resident_memory_bytes" in names  # Linux: from /proc


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:9464", ("127.0.0.1", 9464)),
    (":9464", ("0.0.0.0", 9464)),
    ("[::1]:9464", ("::1", 9464)),
    ("metrics.local:1", ("metrics.local", 1)),
])
def test_parse_listen(text, expected):
    assert parse_listen(text, "METRICS_LISTEN") == expected


@pytest.mark.parametrize("text", ["9464", "host:", "host:0", "host:70000", "::1:9464", "host:port"])
def test_parse_listen_refuses(text):
    with pytest.raises(ValueError, match="METRICS_LISTEN"):
        parse_listen(text, "METRICS_LISTEN")
