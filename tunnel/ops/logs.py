"""Logging set-up shared by relay and agent: plain or JSON lines on stderr, with secrets
redacted from every record as a last line of defence (the code never logs them on purpose)."""

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


def redact(text: str) -> str:
    return _URL_PASSWORD.sub(r"\1:[redacted]@", _SECRET.sub("[redacted]", text))


class _PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = f"{stamp}.{int(record.msecs):03d}Z {record.levelname:<7} {record.name}: {record.getMessage()}"
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
        return json.dumps(entry, separators=(",", ":"))


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
