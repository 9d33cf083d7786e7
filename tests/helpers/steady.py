"""A steady stream of new worker connections through a resource endpoint, as an integration
platform makes them: each connects, sends a request, half-closes and reads the echo. Every
attempt is recorded with its outcome, so a test can say which failed and when."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass


@dataclass
class Attempt:
    started: float
    #: "ok", "refused" (the endpoint did not accept: nothing listens) or "failed: ..." (accepted,
    #: then reset or closed without the full echo).
    outcome: str
    ended: float


class SteadyConnections:
    """``workers`` threads, each making one connection after another to ``addr`` (a new one
    ``pause`` seconds after the last ended) until :meth:`stop`."""

    def __init__(self, addr: tuple[str, int], workers: int = 3, pause: float = 0.05, timeout: float = 20.0) -> None:
        self.addr = addr
        self.pause = pause
        self.timeout = timeout
        self.attempts: list[Attempt] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(workers)]

    def __enter__(self) -> "SteadyConnections":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 5)

    def _loop(self, worker: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            payload = f"worker {worker} request {n} ".encode() * 20
            started = time.monotonic()
            outcome = self._one(payload)
            with self._lock:
                self.attempts.append(Attempt(started, outcome, time.monotonic()))
            self._stop.wait(self.pause)

    def _one(self, payload: bytes) -> str:
        try:
            s = socket.create_connection(self.addr, timeout=self.timeout)
        except OSError:
            return "refused"
        try:
            with s:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
                chunks = []
                while data := s.recv(65536):
                    chunks.append(data)
        except OSError as exc:
            return f"failed: {exc.__class__.__name__}"
        got = b"".join(chunks)
        return "ok" if got == payload else f"failed: {len(got)} of {len(payload)} bytes echoed"

    def snapshot(self) -> list[Attempt]:
        with self._lock:
            return list(self.attempts)

    def count_ok(self, since: float = 0.0) -> int:
        return sum(1 for a in self.snapshot() if a.outcome == "ok" and a.started >= since)

    def failures(self, since: float = 0.0) -> list[Attempt]:
        return [a for a in self.snapshot() if a.outcome != "ok" and a.started >= since]
