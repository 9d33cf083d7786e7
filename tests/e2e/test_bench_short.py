"""Short forms of the benchmarks behind the published figures (README, bench/README.md,
docs/CLUSTER.md), so that a refactor cannot silently break one: the end-to-end harness with
every metric group once (``bench/e2e.py --smoke``: each system, each group, one WAN point), the
cluster scale benchmark with 90 simulated agents, one kill and one drain, and the
relay-to-relay hop (``bench/bench_forwarding.py``) with short runs, and the CPU, round-trip,
idle-memory and QUIC engine benchmarks once each, small. They
check that each benchmark runs and measures, not the figures (benchmarks are not timed tests);
the short form of QUIC under load (``bench/quic_under_load.py`` without CPU hogs) checks its
outcome too: no link lost, every byte verified."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.e2e import GROUPS, METRIC_BY_KEY, add_wan_metrics  # noqa: E402
from bench.peers import cpucap  # noqa: E402
from bench.wan.path import unavailable_reason as wan_unavailable  # noqa: E402
from tests.helpers.cluster import aliases_work  # noqa: E402

SYSTEMS = ("ssh-aes128gcm", "tunnel-wss", "tunnel-quic")


def test_e2e_harness_measures_every_group(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "e2e.py"), "--smoke", "--systems", ",".join(SYSTEMS),
         "--wan-loss", "1", "--results-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "latest.json").read_text())
    meta = data["metadata"]
    assert not meta["errors"] and not meta["skipped"], (meta["errors"], meta["skipped"])
    groups = set(GROUPS)
    if cpucap.unavailable_reason():
        groups.discard("capped")
    if wan_unavailable():
        groups.discard("wan")
    if not (shutil.which("redis-server") and shutil.which("redis-benchmark")):
        groups.discard("redis")
    add_wan_metrics((0.01,))
    measured = {(row["system"], METRIC_BY_KEY[row["metric"]].group) for row in data["rows"]}
    missing = [(system, group) for system in SYSTEMS for group in sorted(groups) if (system, group) not in measured]
    assert not missing, f"no figure for {missing}"


@pytest.mark.skipif(not aliases_work(), reason="127.0.0.2/.3 are not loopback addresses here")
def test_cluster_scale_brings_a_killed_relays_agents_back(tmp_path):
    out = tmp_path / "cluster-scale.json"
    agents = 90  # 30 a relay: every phase runs; the figures come from the full run
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "cluster_scale.py"), "--agents", str(agents), "--swarms", "1",
         "--timeout", "120", "--out", str(out)],
        capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    on_victim = results["restart_kill"]["links_on_the_restarted_relay_before"]
    assert on_victim == agents // 3
    # Every agent of the killed relay registered again (a simulator that cannot reconnect
    # never gets here: the run times out waiting for them).
    assert results["restart_kill"]["registrations"] >= on_victim
    assert results["restart_drain"]["registrations"] >= on_victim
    assert all(kib and kib > 0 for kib in results["memory"]["kib_per_idle_link"])


@pytest.mark.skipif(not aliases_work(), reason="127.0.0.2/.3 are not loopback addresses here")
def test_forwarding_benchmark_measures_both_paths(tmp_path):
    out = tmp_path / "forwarding.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_forwarding.py"), "--rounds", "200", "--bulk-mib", "4",
         "--pg-seconds", "1", "--pg-repeat", "1", "--out", str(out)], capture_output=True, text=True, timeout=600,
        cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    for path in ("local agent (relay 2)", "forwarded (relay 1 -> relay 2)"):
        assert all(results[path][k] > 0 for k in ("rtt_p50_us", "connections_per_s", "bulk_mbit_s")), results
        assert results["pgbench_select_tps"][path][0] > 0, results
        assert results["pgbench_cpu_us_per_transaction"][path]["relay 2"] > 0, results


@pytest.mark.parametrize("argv,expect", [
    (["bulk_cpu.py", "--runs", "1", "--mbytes", "32"], "medians"),
    (["roundtrip_cpu.py", "--runs", "1", "--count", "300", "--settle", "0.2"], "medians"),
    (["bulk_cpu.py", "--trees", ".:quic", "--runs", "1", "--mbytes", "8"], ":quic"),
    (["roundtrip_cpu.py", "--trees", ".:auto", "--runs", "1", "--count", "100", "--settle", "0.2"], ":auto"),
    (["idle_rss.py"], "first TLS 1.3 connection"),
    (["udp_receive.py", "--count", "2000", "--repeat", "1"], "batch"),
    (["quic_engines.py", "--systems", "aioquic=aioquic", "--megabytes", "2", "--repeat", "1", "--handshakes", "3"],
     "| aioquic |"),
], ids=lambda v: v[0] if isinstance(v, list) else None)
def test_cpu_and_memory_benchmarks_run(argv, expect):
    """The per-process CPU, round-trip, idle-memory and QUIC engine benchmarks behind the
    figures of bench/README.md, each run once, small."""
    proc = subprocess.run([sys.executable, str(REPO / "bench" / argv[0]), *argv[1:]],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0 and expect in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.skipif(not shutil.which("redis-server"), reason="redis-server not installed (scripts/setup.sh)")
def test_quic_under_load_loses_no_link(tmp_path):
    """The short form of bench/quic_under_load.py (no CPU hogs): 6.7 MB Redis GETs and SETs over
    a QUIC link; no link lost, no transfer failed, every byte checked."""
    out = tmp_path / "quic-under-load.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "quic_under_load.py"), "--seconds", "8", "--hogs", "0", "--clients",
         "3", "--keys", "2", "--json", str(out), "--logs", str(tmp_path / "logs")],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    run, = json.loads(out.read_text())["runs"]
    assert run["links_lost"] == 0 and run["idle_timeouts"] == 0, run
    assert not any(run["failures"].values()) and not run["clients_stuck"], run
    size = int(6.7e6)
    assert run["bytes_verified"] == size * sum(run["transfers"].values()) > 0, run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.skipif(not shutil.which("redis-server"), reason="redis-server not installed (scripts/setup.sh)")
def test_quic_under_load_counts_a_lost_link(tmp_path):
    """The counts behind the test above are not blind: an agent stopped (SIGSTOP) for longer
    than its link's idle bound loses its link, and the run says so and fails."""
    out = tmp_path / "quic-under-load.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "quic_under_load.py"), "--seconds", "12", "--hogs", "0", "--clients",
         "2", "--keys", "1", "--agent-keepalive", "4", "--freeze-agent", "6", "--json", str(out),
         "--logs", str(tmp_path / "logs")],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    run, = json.loads(out.read_text())["runs"]
    assert run["links_lost"] >= 1 and run["relay"]["relay_disconnects"] >= 1, run
    assert proc.returncode == 1 and "FAIL" in proc.stdout, proc.stdout[-3000:]
