"""Process-wide tuning the entrypoints apply once at start."""

from __future__ import annotations

from tunnel import codec
from tunnel.carriers.wss import MALLOC_MMAP_THRESHOLD, MALLOC_TRIM_THRESHOLD


def tune_malloc() -> bool:
    """Keep glibc from serving each large TLS/WebSocket buffer with fresh pages (see
    ``tunnel.carriers.wss.MALLOC_MMAP_THRESHOLD``); False off glibc."""
    return codec.tune_malloc(MALLOC_MMAP_THRESHOLD, MALLOC_TRIM_THRESHOLD)
