"""The audit log: one JSON line per worker connection to a resource endpoint, when it ends
(``serve --audit-log FILE``, ``RELAY_AUDIT_LOG``; ``-``: the relay's log stream).

A line (keys in this order)::

    {"type": "connection", "opened": "2026-01-02T03:04:05.123Z", "closed": "…", "duration_s": 1.5,
     "customer": "cus_…", "resource": "res_…", "resource_name": "orders-db",
     "worker": "10.0.0.7:51234", "relay": "rly_…", "agent_instance": "…" | null,
     "agent": "agt_…" | null, "transport": "wss" | "quic" | "relay" | null,
     "bytes_to_resource": 1234, "bytes_from_resource": 5678,
     "end": "closed" | "reset" | "refused", "reason": "eof" | "<error code>" | "<refusal>"}

``transport`` ``relay``: the connection went to another relay of the cluster, which holds the
agent (``agent_instance`` is then null). ``end`` ``refused``: closed at once, ``reason`` says
why (``not_allowed``, ``no_agent``, ``quota``, ``link_closing``); ``reset``: the stream was
reset (``reason`` the error code's name, e.g. ``connection_reset``, ``connect_failed``).

Off the data path: a finished connection costs one tuple appended to a list; the lines are
formatted and written every ``FLUSH_INTERVAL`` (or sooner past ``FLUSH_LINES``) by a worker
thread, so a slow disk never stalls the event loop (bench/bench_audit.py measures the cost).
Past ``MAX_PENDING`` unwritten lines (a disk that stopped) lines are dropped, counted, and the
loss logged. The file is opened in append mode (mode 0640),
so logrotate's ``copytruncate`` works as is; SIGHUP reopens it (after a rename by logrotate's
default ``create`` mode, or by hand).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time

import orjson

log = logging.getLogger("relay.audit")

FLUSH_INTERVAL = 0.5
FLUSH_LINES = 2048
#: Unwritten lines kept at most (a disk that stopped); more are dropped and counted.
MAX_PENDING = 100_000


class _Clock:
    """ISO 8601 times with milliseconds, the formatted second kept between calls (a burst of
    lines shares it)."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def iso(self, seconds: float) -> str:
        whole = int(seconds)
        if whole != self._second:
            self._second = whole
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        return f"{self._prefix}.{int((seconds - whole) * 1000):03d}Z"


def render(records, clock: _Clock | None = None) -> bytes:
    """The JSON lines of ``records`` (tuples in the order of ``AuditLog.connection``)."""
    iso = (clock or _Clock()).iso
    out = []
    for (opened, closed, customer, resource, name, worker, relay, instance, agent, transport, up, down, end,
         reason) in records:
        if isinstance(worker, tuple):  # a socket address
            host, port = worker[:2]
            worker = f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
        out.append(orjson.dumps({
            "type": "connection", "opened": iso(opened), "closed": iso(closed),
            "duration_s": round(max(0.0, closed - opened), 3), "customer": customer, "resource": resource,
            "resource_name": name, "worker": worker, "relay": relay, "agent_instance": instance, "agent": agent,
            "transport": transport, "bytes_to_resource": up, "bytes_from_resource": down, "end": end,
            "reason": reason,
        }))
    out.append(b"")
    return b"\n".join(out)


class AuditLog:
    """Buffered writer of audit lines to ``path`` (``-``: the ``relay.audit`` logger)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._pending: list[tuple] = []
        self.dropped = 0
        self.written = 0
        self._fd = -1
        self._lock = threading.Lock()  # the file descriptor, between the loop and the writer thread
        self._clock = _Clock()
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: asyncio.Future | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        if path != "-":
            self._fd = self._open()

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def reopen(self) -> None:
        """SIGHUP: go on in a fresh file at ``path`` (lines not yet written go there too)."""
        if self.path == "-":
            return
        try:
            fd = self._open()
        except OSError as exc:
            log.error("cannot reopen the audit log %s: %s; writing on to the old file", self.path,
                      exc.strerror or exc)
            return
        with self._lock:
            old, self._fd = self._fd, fd
        if old >= 0:
            os.close(old)
        log.info("audit log %s reopened", self.path)

    def connection(self, opened: float, closed: float, customer: str, resource: str, resource_name: str,
                   worker: tuple | str | None, relay: str, agent_instance: str | None, agent: str | None,
                   transport: str | None, bytes_to_resource: int, bytes_from_resource: int, end: str,
                   reason: str) -> None:
        """Record one finished worker connection (times are Unix seconds). Only a tuple is
        kept here; the line is formatted and written later, off the event loop."""
        if len(self._pending) >= MAX_PENDING:
            if not self.dropped:
                log.error("the audit log %s does not keep up (%d lines unwritten): dropping lines", self.path,
                          len(self._pending))
            self.dropped += 1
            return
        self._pending.append((opened, closed, customer, resource, resource_name, worker, relay, agent_instance,
                              agent, transport, bytes_to_resource, bytes_from_resource, end, reason))
        if self._loop is None:
            return
        if len(self._pending) >= FLUSH_LINES:
            self._flush_soon(0)
        elif self._timer is None:
            self._flush_soon(FLUSH_INTERVAL)

    def _flush_soon(self, delay: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(delay, self._start_flush)

    def _take(self) -> list[tuple]:
        records, self._pending = self._pending, []
        return records

    def _start_flush(self) -> None:
        self._timer = None
        if self._flushing is not None or not self._pending:
            if self._pending:
                self._flush_soon(FLUSH_INTERVAL)
            return
        records = self._take()
        if self.path == "-":
            self._log(records)
            return
        self._flushing = self._loop.run_in_executor(None, self._write, records)
        self._flushing.add_done_callback(self._flushed)

    def _log(self, records) -> None:
        for line in render(records, self._clock).splitlines():
            log.info("%s", line.decode())
        self.written += len(records)

    def _flushed(self, future: asyncio.Future) -> None:
        self._flushing = None
        if future.exception() is not None:
            log.error("writing the audit log %s failed: %s", self.path, future.exception())
        if self._pending:
            self._flush_soon(0 if len(self._pending) >= FLUSH_LINES else FLUSH_INTERVAL)

    def _write(self, records: list[tuple]) -> None:
        """Format and write ``records`` (in the writer thread)."""
        if not records:
            return
        data = memoryview(render(records, self._clock))
        with self._lock:
            while data:
                n = os.write(self._fd, data)
                data = data[n:]
        self.written += len(records)

    async def close(self) -> None:
        """Write everything buffered and close the file."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._flushing is not None:
            await asyncio.wait([self._flushing])
        records = self._take()
        if self.path == "-":
            self._log(records)
        else:
            try:
                self._write(records)
            except OSError as exc:
                log.error("writing the audit log %s failed: %s", self.path, exc)
            with self._lock:
                fd, self._fd = self._fd, -1
            if fd >= 0:
                os.close(fd)
        if self.dropped:
            log.error("the audit log %s dropped %d line(s) because writing did not keep up", self.path, self.dropped)
