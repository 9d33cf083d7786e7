"""The audit log's writer (relay.data.audit): lines written off the loop, the log stream, bounds."""

import asyncio
import json
import logging

from relay.data import audit as audit_module
from relay.data.audit import AuditLog


def record(log: AuditLog, n: int) -> None:
    log.connection(1767225600.25, 1767225601.5, "cus_a", "res_a", "db", ("10.0.0.7", 5000 + n), "rly_a", "inst",
                   "agt_a", "quic", n, 2 * n, "closed", "eof")


def test_lines_reach_the_file_and_close_writes_the_rest(tmp_path):
    path = tmp_path / "audit.log"

    async def go():
        log = AuditLog(str(path))
        log.start(asyncio.get_running_loop())
        for n in range(3):
            record(log, n)
        await log.close()

    asyncio.run(go())
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["worker"], r["bytes_to_resource"], r["bytes_from_resource"]) for r in lines] == [
        ("10.0.0.7:5000", 0, 0), ("10.0.0.7:5001", 1, 2), ("10.0.0.7:5002", 2, 4)]
    assert lines[0]["opened"] == "2026-01-01T00:00:00.250Z" and lines[0]["duration_s"] == 1.25
    assert lines[0]["transport"] == "quic" and lines[0]["end"] == "closed"


def test_dash_writes_to_the_log_stream(caplog):
    async def go():
        log = AuditLog("-")
        log.start(asyncio.get_running_loop())
        record(log, 1)
        await log.close()

    with caplog.at_level(logging.INFO, logger="relay.audit"):
        asyncio.run(go())
    assert json.loads(caplog.records[-1].getMessage())["worker"] == "10.0.0.7:5001"


def test_a_stalled_disk_drops_lines_instead_of_growing(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(audit_module, "MAX_PENDING", 2)
    log = AuditLog(str(tmp_path / "audit.log"))  # no loop: nothing is flushed
    for n in range(5):
        record(log, n)
    assert log.dropped == 3
    assert "does not keep up" in caplog.text
