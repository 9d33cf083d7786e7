"""The Prometheus text exposition format (version 0.0.4), written by us.

Relay and agent build their metric families at scrape time from the state they already keep
(collectors), plus a few plain integer counters for events; :func:`render` writes them out.
We do not use ``prometheus-client``: importing it costs the agent about 2.4 MB of RSS (its
package imports ``http.server``, ``wsgiref``, ``email`` and ``urllib.request`` whatever part
is used), a tenth of the agent's 25 MB idle budget, for what fits in this module
(docs/METRICS.md, "Why not prometheus-client").

::

    family = Family("tunnel_agent_reconnects_total", "counter", "Reconnects.", ("relay",))
    family.add(("relay.example.com:443",), 3)
    render([family])  # b'# HELP tunnel_agent_reconnects_total Reconnects.\\n# TYPE ...'

Label values are escaped as the format asks (backslash, double quote, newline), so no value
can break a line; what goes into labels is still chosen with care by the callers (ids and
fixed reason words, never secrets or text a peer sent).
"""

from __future__ import annotations

import math
import os
import time
from bisect import bisect_left
from collections.abc import Iterable, Sequence

__all__ = ["CONTENT_TYPE", "Family", "Histogram", "process_families", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
KINDS = ("counter", "gauge", "histogram")


class Histogram:
    """Observations counted into cumulative buckets (upper bounds ``bounds``, then +Inf)."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: Sequence[float]) -> None:
        if list(bounds) != sorted(set(bounds)):
            raise ValueError("histogram bounds must be increasing")
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (le = "less or equal").
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1


class Family:
    """One metric family: a name, a type, a help text, label names and its samples."""

    __slots__ = ("name", "kind", "help", "labels", "samples")

    def __init__(self, name: str, kind: str, help: str, labels: Sequence[str] = ()) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown metric type {kind!r}")
        self.name = name
        self.kind = kind
        self.help = help
        self.labels = tuple(labels)
        #: ``(name suffix, label values, extra label text, value)``
        self.samples: list[tuple[str, tuple, str, float]] = []

    def add(self, values: Sequence, value: float) -> "Family":
        """One sample with these label values (in the order of ``labels``)."""
        self.samples.append(("", self._check(values), "", value))
        return self

    def add_histogram(self, values: Sequence, histogram: Histogram) -> "Family":
        """The ``_bucket``, ``_sum`` and ``_count`` samples of ``histogram``."""
        values = self._check(values)
        running = 0
        for bound, n in zip((*histogram.bounds, math.inf), histogram.counts):
            running += n
            self.samples.append(("_bucket", values, f'le="{_number(bound)}"', running))
        self.samples.append(("_sum", values, "", histogram.sum))
        self.samples.append(("_count", values, "", histogram.count))
        return self

    def _check(self, values: Sequence) -> tuple:
        values = tuple(str(v) for v in values)
        if len(values) != len(self.labels):
            raise ValueError(f"{self.name}: {len(self.labels)} label values expected, got {len(values)}")
        return values


def render(families: Iterable[Family]) -> bytes:
    """The text exposition of ``families``."""
    out: list[str] = []
    for family in families:
        out.append(f"# HELP {family.name} {_escape_help(family.help)}\n# TYPE {family.name} {family.kind}\n")
        names = family.labels
        for suffix, values, extra, value in family.samples:
            pairs = [f'{n}="{_escape_label(v)}"' for n, v in zip(names, values)]
            if extra:
                pairs.append(extra)
            labels = "{" + ",".join(pairs) + "}" if pairs else ""
            out.append(f"{family.name}{suffix}{labels} {_number(value)}\n")
    return "".join(out).encode()


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


_START = time.time()


def process_families() -> list[Family]:
    """The standard ``process_*`` metrics: CPU seconds, resident memory, open descriptors
    (where /proc has them: Linux) and start time."""
    times = os.times()
    families = [
        Family("process_cpu_seconds_total", "counter", "User and system CPU time spent, in seconds.")
        .add((), times.user + times.system),
        Family("process_start_time_seconds", "gauge", "Start time of the process since the Unix epoch, in seconds.")
        .add((), _START),
    ]
    try:
        with open("/proc/self/statm", "rb") as f:
            resident_pages = int(f.read().split()[1])
        families.append(Family("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.")
                        .add((), resident_pages * os.sysconf("SC_PAGE_SIZE")))
        families.append(Family("process_open_fds", "gauge", "Number of open file descriptors.")
                        .add((), len(os.listdir("/proc/self/fd"))))
    except (OSError, ValueError, IndexError, AttributeError):
        pass  # no /proc here
    return families
