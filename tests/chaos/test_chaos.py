"""The chaos harness's short run (about three minutes, a fixed seed): random faults against a
steady workload on a real cluster; every promise of tests/chaos/harness.py must hold. A failure
prints the report; ``python -m tests.chaos --seed 11 --seconds 150`` replays the same faults."""

from __future__ import annotations

import json

import pytest

from tests.chaos.harness import Settings, available_faults, run, unavailable_reason

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=f"chaos harness: {unavailable_reason()}")

SEED = 11


def test_short_chaos_run_keeps_every_promise(tmp_path):
    report = run(Settings(seconds=150, seed=SEED, faults=available_faults()), tmp_path / "chaos")
    shown = json.dumps({k: report[k] for k in ("faults", "attempts", "failures", "violations", "resources",
                                         "work_dir")}, indent=1)
    assert report["faults"] and report["attempts"]["echo"]["ok"] > 0, shown
    # Every check holds, the survivors' RSS within 10 % of their baseline too: freed heap pages
    # go back to the system every 10 s (tunnel.ops.process.release_free_memory).
    assert not report["violations"], shown
