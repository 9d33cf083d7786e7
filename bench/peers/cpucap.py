"""A process capped at a fraction of one core by a cgroup v1 CPU quota: the slow host.

    with CpuCap(0.31) as cap:      # 0.31 of a core: an 800 MHz-class host beside a 2.6 GHz one
        cap.add(agent_pid)          # the process and all its threads and children
        ...                         # measure
    cap.throttled_seconds           # how long the kernel held it back

The cgroup is made under the harness's own ``cpu`` cgroup (``/sys/fs/cgroup/cpu/...``) with
``cpu.cfs_quota_us / cpu.cfs_period_us`` = the fraction, and the shortest period the kernel
accepts for it (the quota must be at least 1 ms: 3.3 ms periods for 0.31 of a core), not the
default 100 ms. A capped process runs at full speed until its quota is spent and then waits
out the period; a slow CPU instead runs every step slower and never pauses. Short periods
keep those pauses near the per-message times being measured (measured here: a WSS agent's
64-byte round trip p99 under the cap was 1.0-1.5 ms with 3.3 ms periods, 2.4 ms with 10 ms),
so the round-trip percentiles show the slowdown rather than the quota's rhythm. On exit the
processes still alive go back to the cgroup they came from and the cgroup is removed.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from pathlib import Path

from .procs import HarnessError, descendants

CPU_ROOT = Path("/sys/fs/cgroup/cpu")
MIN_QUOTA_US = 1000      # the kernel refuses smaller quotas (and periods)
_counter = itertools.count(1)


def unavailable_reason() -> str | None:
    """None when a CPU quota can be set here, else why not."""
    if not (CPU_ROOT / "cpu.cfs_quota_us").exists():
        return "no cgroup v1 cpu controller with CFS quotas at /sys/fs/cgroup/cpu"
    if not os.access(_own_cgroup(), os.W_OK):
        return f"cannot create cgroups under {_own_cgroup()} (needs root)"
    return None


def _cgroup_of(pid: int | str) -> Path:
    """The ``cpu`` cgroup directory ``pid`` is in."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "cpu" in controllers.split(","):
            return CPU_ROOT / path.lstrip("/")
    return CPU_ROOT


def _own_cgroup() -> Path:
    return _cgroup_of("self")


class CpuCap:
    """A fresh cgroup whose members share ``cores`` of CPU time."""

    def __init__(self, cores: float, period_us: int | None = None) -> None:
        if not 0.01 <= cores <= os.cpu_count():  # type: ignore[operator]
            raise ValueError(f"cores must be between 0.01 and {os.cpu_count()}, got {cores}")
        self.cores = cores
        self.period_us = period_us or max(MIN_QUOTA_US, math.ceil(MIN_QUOTA_US / cores))
        self.dir = _own_cgroup() / f"tunnel-bench-{os.getpid()}-{next(_counter)}"
        self.origin: dict[int, Path] = {}
        self.throttled_seconds = 0.0

    def __enter__(self) -> "CpuCap":
        reason = unavailable_reason()
        if reason:
            raise HarnessError(reason)
        self.dir.mkdir()
        try:
            (self.dir / "cpu.cfs_period_us").write_text(str(self.period_us))
            (self.dir / "cpu.cfs_quota_us").write_text(str(round(self.cores * self.period_us)))
        except OSError as e:
            self.dir.rmdir()
            raise HarnessError(f"cannot set a CPU quota in {self.dir}: {e}") from None
        return self

    def add(self, pid: int) -> None:
        """Move ``pid`` and its descendants (every thread of each) into the cgroup."""
        for p in descendants(pid):
            try:
                self.origin[p] = _cgroup_of(p)
                (self.dir / "cgroup.procs").write_text(str(p))
            except (OSError, ValueError) as e:
                if Path(f"/proc/{p}").exists():
                    raise HarnessError(f"cannot move pid {p} into {self.dir}: {e}") from None

    def _throttled(self) -> float:
        try:
            for line in (self.dir / "cpu.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "throttled_time":
                    return int(value) / 1e9
        except (OSError, ValueError):
            pass
        return 0.0

    def __exit__(self, *exc) -> None:
        self.throttled_seconds = self._throttled()
        for pid, origin in self.origin.items():
            try:
                (origin / "cgroup.procs").write_text(str(pid))
            except OSError:
                pass  # gone already
        deadline = time.monotonic() + 5
        while True:
            try:
                self.dir.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:  # a task is still leaving
                if time.monotonic() > deadline:
                    return
                time.sleep(0.05)
