"""Logging set-up shared by relay and agent: plain or JSON lines on stderr, with secrets
redacted from every record as a last line of defence (the code never logs them on purpose),
and control characters escaped so that a string from the other side (an agent's hostname,
a relay's error text) can never forge a log line or reach a terminal raw.

:class:`Throttled` logs a recurring condition (a customer over quota, a full state
directory) once per interval instead of once per occurrence."""

from __future__ import annotations

import json
import logging
import re
import sys
import time

# JWTs (three base64url parts, the first starting with '{"' encoded) and bearer tokens.
_SECRET = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*|(?i:bearer)\s+[A-Za-z0-9._~+/=-]{8,}")
# The password of a URL (scheme://user:password@host), such as a database URL.
_URL_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*):[^\s@/]+@")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def redact(text: str) -> str:
    return _URL_PASSWORD.sub(r"\1:[redacted]@", _SECRET.sub("[redacted]", text))


def escape(text: str) -> str:
    """``text`` with every non-printable character (newlines, ESC, C1 controls, bidi
    overrides...) written as a backslash escape; printable text, any script, unchanged."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _ESCAPES.get(c) or (
        f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}")
        for c in text)


class _PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = f"{stamp}.{int(record.msecs):03d}Z {record.levelname:<7} {record.name}: {escape(record.getMessage())}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return redact(line)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, separators=(",", ":"))  # ensure_ascii: every control character escaped


def configure(fmt: str = "plain", level: str = "INFO") -> None:
    """Send logs to stderr as ``plain`` text or ``json`` lines."""
    if fmt not in ("plain", "json"):
        raise ValueError("log format must be 'plain' or 'json'")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _PlainFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aioquic narrates every packet-level state change; keep only its warnings.
    logging.getLogger("quic").setLevel(logging.WARNING)


class Throttled:
    """Log a recurring condition once per ``interval`` seconds per key; the next line says
    how many were held back meanwhile."""

    #: Keys remembered at most; older ones are forgotten first.
    MAX_KEYS = 4096

    def __init__(self, logger: logging.Logger, interval: float = 60.0, clock=time.monotonic) -> None:
        self.logger = logger
        self.interval = interval
        self._clock = clock
        self._seen: dict = {}  # key -> [last logged at, held back since]

    def would_log(self, key) -> bool:
        """True when :meth:`log` with ``key`` would log now."""
        entry = self._seen.get(key)
        return entry is None or self._clock() - entry[0] >= self.interval

    def log(self, key, level: int, msg: str, *args) -> bool:
        """Log ``msg % args`` unless ``key`` was logged less than ``interval`` ago; True if logged."""
        now = self._clock()
        entry = self._seen.get(key)
        if entry is not None and now - entry[0] < self.interval:
            entry[1] += 1
            return False
        if entry is not None and entry[1]:
            msg += " (%d more in the last %.0f s)"
            args = (*args, entry[1], now - entry[0])
        if entry is None and len(self._seen) >= self.MAX_KEYS:
            self._seen.pop(next(iter(self._seen)))
        self._seen.pop(key, None)
        self._seen[key] = [now, 0]
        self.logger.log(level, msg, *args)
        return True
