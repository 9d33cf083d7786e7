"""The agent's idle memory with and without ``METRICS_LISTEN``, this tree beside another
revision (by default the one before the metrics server moved to h11), in one run:

    python bench/metrics_rss.py [--base REV] [--runs 3] [--idle 3]

One relay (this tree's); for each run and each of the four agents (base or this tree, metrics
off or on), an agent registers a resource, the metrics one answers one scrape of ``/metrics``
and ``/ready`` (so the server's code has run, as under Prometheus), then it idles ``--idle``
seconds and its VmRSS is read. Agents run from ``python -m agent`` with their tree first on
``PYTHONPATH``; the base tree is ``git archive REV`` with this tree's compiled modules copied
in (the compiled sources must not differ between the two). Prints one Markdown table of
medians.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.peers.ours import OurRelay, _rows  # noqa: E402
from bench.peers.procs import LOOPBACK, ProcessRegistry, free_port, python, python_env, rss_bytes, \
    wait_until  # noqa: E402

DEFAULT_BASE = "cc42d6f"  # the last revision with the hand-written metrics server


def export(rev: str, into: Path) -> Path:
    """``rev``'s tracked files in ``into``, with this tree's compiled modules beside them."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", rev],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    for so in REPO.glob("tunnel/**/*.so"):
        target = into / so.relative_to(REPO)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(so, target)
    return into


def measure(reg: ProcessRegistry, relay: OurRelay, tree: Path, name: str, metrics: bool, idle: float) -> int:
    env = python_env({"PYTHONPATH": str(tree), "RELAY_URL": f"wss://{LOOPBACK}:{relay.port}",
                      "RELAY_CA_FILE": str(relay.state / "ca.pem"), "REGISTRATION_JWT": relay.registration_jwt(),
                      "NAME": name, "APP_HOST": LOOPBACK, "APP_PORT": "9"})
    metrics_port = free_port()
    if metrics:
        env["METRICS_LISTEN"] = f"{LOOPBACK}:{metrics_port}"
    proc = reg.spawn([python(), "-m", "agent"], f"agent-{name}", env=env, cwd=tree)
    try:
        def registered() -> bool:
            rows = _rows(relay.cmd("resources", "list", "--output", "json"))
            return any(row.get("name") == name and row.get("status") == "AVAILABLE" for row in rows)

        wait_until(registered, 60, f"agent {name} registered", lambda: proc.poll() is None, interval=0.2)
        if metrics:
            for path in ("/metrics", "/ready"):
                with urllib.request.urlopen(f"http://{LOOPBACK}:{metrics_port}{path}", timeout=10) as answer:
                    answer.read()
        time.sleep(idle)  # the measurement is of an idle agent: nothing to wait for but time
        return rss_bytes(proc.pid, include_children=False)
    finally:
        reg.stop(proc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=DEFAULT_BASE)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--idle", type=float, default=3.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="metrics-rss-") as tmp:
        work = Path(tmp)
        base = export(args.base, work / "base")
        reg = ProcessRegistry(work / "logs")
        try:
            relay = OurRelay(reg, work / "relay-state")
            relay.start()
            results: dict[tuple[str, bool], list[int]] = {}
            for run in range(args.runs):
                for label, tree in ((args.base, base), ("this tree", REPO)):
                    for metrics in (False, True):
                        name = f"r{run}-{'base' if tree is base else 'this'}-{'on' if metrics else 'off'}"
                        results.setdefault((label, metrics), []).append(
                            measure(reg, relay, tree, name, metrics, args.idle))
        finally:
            reg.close()
    print(f"| agent (idle {args.idle:.0f} s, median of {args.runs}) | METRICS_LISTEN unset, MB | "
          "METRICS_LISTEN set, MB | difference, MB |")
    print("|---|---|---|---|")
    for label in (args.base, "this tree"):
        off = statistics.median(results[(label, False)]) / 1e6
        on = statistics.median(results[(label, True)]) / 1e6
        print(f"| {label} | {off:.2f} | {on:.2f} | {on - off:+.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
