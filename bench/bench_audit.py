"""What the audit log (``serve --audit-log``) costs, side by side in one run.

Two relays, one with an audit file and one without, each with one WSS agent in front of the
same echo service; short connections (connect, one 64-byte round trip, close) are driven
through each in turn, several rounds, and the relays' CPU time per connection is read from
/proc. Also the cost of one audit record in process (what the relay's event loop pays per
finished connection). Run from the repository root::

    python -m bench.bench_audit [--seconds 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench.peers.clients import connection_rate
from bench.peers.ours import OurRelay
from bench.peers.procs import ProcessRegistry, cpu_seconds, free_port, python, python_env, wait_listening


def record_cost(n: int = 100_000) -> tuple[float, float]:
    """Microseconds per audit record: on the event loop (kept in the buffer) and in the writer
    thread (formatted as a JSON line)."""
    from relay.data.audit import AuditLog, render

    audit = AuditLog("-")
    now = time.time()
    start = time.perf_counter()
    for i in range(n):
        audit.connection(now + i * 1e-4, now + i * 1e-4 + 0.01, "cus_abcdefghijklmnop", "res_abcdefghijklmnop",
                         "orders-db", "10.1.2.3:54321", "rly_abcdefghijklmnop", "i-0123456789abcdef",
                         "agt_0123456789abcdef", "wss", i, i, "closed", "eof")
    on_loop = (time.perf_counter() - start) / n * 1e6
    records = audit._take()
    start = time.perf_counter()
    render(records)
    return on_loop, (time.perf_counter() - start) / n * 1e6


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp:
        work = Path(tmp)
        reg = ProcessRegistry(work / "logs")
        try:
            echo_port = free_port()
            echo = reg.spawn([python(), "-m", "bench.peers.echo", "--port", str(echo_port)], "echo",
                             env=python_env())
            wait_listening(echo_port, 10, echo, "echo")
            relays = {}
            for label in ("off", "on"):
                relay = OurRelay(reg, work / f"relay-{label}")
                if label == "on":
                    relay.env["RELAY_AUDIT_LOG"] = str(work / "audit.log")
                relay.start()
                port, _agent = relay.expose("echo", echo_port, "wss")
                relays[label] = (relay, port)
            rates = {"off": [], "on": []}
            cpu = {"off": [], "on": []}
            for _ in range(args.rounds):
                for label, (relay, port) in relays.items():
                    before = cpu_seconds(relay.proc.pid)
                    result = connection_rate(port, args.seconds)
                    used = cpu_seconds(relay.proc.pid) - before
                    rates[label].append(result.per_second)
                    cpu[label].append(used / max(1, result.completed) * 1e6)
            time.sleep(1.0)  # the last lines reach the file (flushed every 0.5 s)
            lines = sum(1 for _ in open(work / "audit.log", "rb"))
        finally:
            reg.close()
    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
    cpu_off, cpu_on = statistics.median(cpu["off"]), statistics.median(cpu["on"])
    on_loop, formatting = record_cost()
    print(f"audit record, in process: {on_loop:.2f} us on the event loop, {formatting:.2f} us formatting in the "
          "writer thread, per connection")
    print(f"connections/s through the relay, median of {args.rounds} x {args.seconds:g} s: "
          f"audit off {off:.0f}, on {on:.0f} (ratio {on / off:.3f})")
    print(f"relay CPU per connection: audit off {cpu_off:.0f} us, on {cpu_on:.0f} us; {lines} audit lines written")


if __name__ == "__main__":
    main()
