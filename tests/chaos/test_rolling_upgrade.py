"""A rolling upgrade under the chaos workload (tests/chaos/harness.py, ``upgrade_from``): the
cluster starts on the previous release (tests.helpers.release), then each relay in turn drains
on SIGTERM and starts again on this tree (the first one migrates the shared PostgreSQL while
the older relays still run on it), then each agent. No completed stream may differ from what
was sent, none may hang, and the only failures allowed are long streams still open at a drain
timeout. ``python -m tests.chaos --rolling-upgrade`` runs it longer."""

from __future__ import annotations

import json

import pytest

from tests.chaos.harness import Settings, run, unavailable_reason
from tests.helpers.release import extract_previous_release

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=f"chaos harness: {unavailable_reason()}")


def test_rolling_upgrade_under_load_loses_no_completed_stream(tmp_path):
    _, old = extract_previous_release(tmp_path / "release")
    settings = Settings(seconds=30, seed=3, warmup=6, gap=(1.0, 3.0), long_seconds=(4.0, 16.0), faults=(),
                        upgrade_from=old)
    report = run(settings, tmp_path / "chaos")
    shown = json.dumps({k: report[k] for k in ("faults", "attempts", "failures", "violations", "work_dir")}, indent=1)
    steps = [(f["kind"], f["target"], f["note"]) for f in report["faults"]]
    assert steps == [("relay_upgrade", f"relay{i}", "exit 0") for i in (1, 2, 3)] + [
        ("agent_upgrade", f"agent-{name}", "exit 0") for name in ("a1", "a2", "other")], shown
    assert report["attempts"]["echo"]["ok"] > 0 and report["attempts"]["pgbench"]["ok"] > 0, shown
    assert not report["violations"], shown
