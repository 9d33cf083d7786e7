"""A real Prometheus (Debian's package) scraping relay and agent, for the metrics tests.

:class:`Prometheus` writes a ``prometheus.yml`` with one job per target group, runs the
server on a free loopback port with its data in the test's directory, and queries its HTTP
API. It scrapes every 0.5 s, so a value reaches a query within about a second.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tests.helpers.processes import Proc, free_port, wait_until

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def prometheus_available() -> bool:
    return os.access(PROMETHEUS, os.X_OK) and os.access(PROMTOOL, os.X_OK)


def fetch(url: str, timeout: float = 10) -> tuple[int, bytes]:
    """GET ``url``: ``(status, body)``, also for error statuses."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def promtool_check(exposition: bytes) -> str:
    """``promtool check metrics`` on ``exposition``: its complaints ('' when clean)."""
    out = subprocess.run([PROMTOOL, "check", "metrics"], input=exposition, capture_output=True, timeout=60)
    problems = (out.stdout + out.stderr).decode(errors="replace").strip()
    return problems or ("" if out.returncode == 0 else f"exit code {out.returncode}")


class Prometheus:
    """``prometheus`` scraping ``jobs`` (job name -> list of ``host:port``)."""

    def __init__(self, workdir: Path, jobs: dict[str, list[str]]) -> None:
        self.dir = workdir / "prometheus"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.jobs = jobs
        lines = ["global:", "  scrape_interval: 500ms", "  scrape_timeout: 500ms", "scrape_configs:"]
        for job, targets in jobs.items():
            lines += [f"  - job_name: {job}", "    static_configs:", f"      - targets: {json.dumps(targets)}"]
        self.config = self.dir / "prometheus.yml"
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: Proc | None = None

    def start(self) -> "Prometheus":
        cmd = [PROMETHEUS, f"--config.file={self.config}", f"--storage.tsdb.path={self.dir / 'data'}",
               f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"]
        self.proc = Proc("prometheus", cmd, dict(os.environ), self.dir / "prometheus.log").start()
        wait_until(self._ready, 30, "Prometheus to start")
        return self

    def _ready(self) -> bool:
        if not self.proc.alive():
            raise AssertionError(f"prometheus exited:\n{self.proc.log()[-3000:]}")
        return fetch(f"http://127.0.0.1:{self.port}/-/ready", 2)[0] == 200

    def api(self, path: str, **params) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        status, body = fetch(url)
        answer = json.loads(body)
        if answer.get("status") != "success":
            raise AssertionError(f"Prometheus {path} {params}: {status} {answer}")
        return answer["data"]

    def targets_up(self) -> bool:
        active = self.api("targets", state="active")["activeTargets"]
        return len(active) == sum(map(len, self.jobs.values())) and all(t["health"] == "up" for t in active)

    def query(self, expr: str) -> list[dict]:
        """The instant vector ``expr`` evaluates to now."""
        return self.api("query", query=expr)["result"]

    def value(self, expr: str) -> float | None:
        """The value of ``expr`` when it is one sample, else None."""
        result = self.query(expr)
        return float(result[0]["value"][1]) if len(result) == 1 else None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
