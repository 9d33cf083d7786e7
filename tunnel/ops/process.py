"""Process-wide tuning the entrypoints apply once at start."""

from __future__ import annotations

import asyncio
import os

from tunnel.carriers.tls import prefer_aes128
from tunnel.carriers.wss import MALLOC_MMAP_THRESHOLD, MALLOC_TRIM_THRESHOLD

#: ``prefer_aes128()`` (:func:`tunnel.carriers.tls.prefer_aes128`): the relay's TLS 1.3 suite order.
__all__ = ["prefer_aes128", "tune_malloc"]


def tune_malloc() -> bool:
    """Set glibc's malloc thresholds to ``MALLOC_MMAP_THRESHOLD`` and ``MALLOC_TRIM_THRESHOLD``
    of :mod:`tunnel.carriers.wss`; True if they were set, False off glibc.

    Bulk transfer allocates a ciphertext ``bytes`` per WebSocket message in the TLS layer (and
    the agent a masked copy). By default glibc serves such blocks with mmap, or from a heap top
    it trims again soon after, so every message faults in fresh pages (perf: about a fifth of a
    sending agent's CPU). Thresholds above the message size keep that memory in the heap for
    reuse. The small extension ``tunnel.ops._malloc`` does it; where it is not built, ctypes
    (which costs about 180 KB of RSS more).
    """
    try:
        from tunnel.ops._malloc import tune_malloc as mallopt_thresholds
    except ImportError:
        mallopt_thresholds = _ctypes_tune_malloc
    return mallopt_thresholds(MALLOC_MMAP_THRESHOLD, MALLOC_TRIM_THRESHOLD)


#: Seconds between two :func:`release_free_memory` calls of :func:`release_free_memory_forever`.
TRIM_INTERVAL = 10.0


def release_free_memory() -> bool:
    """Give the heap's free pages back to the system (glibc ``malloc_trim(0)``); True if any
    were, False where none were or off glibc.

    :func:`tune_malloc` keeps freed blocks in the heap for the next burst, and a burst leaves
    free pages scattered between live blocks that glibc only returns when asked: after a chaos
    run a relay's RSS stayed 10-15 % above its baseline with no more live objects, and this
    brought it back within about 5 % (bench/results/chaos/README.md). It costs a few
    milliseconds on a relay's heap, and the next burst faults in what it needs again.
    """
    try:
        from tunnel.ops._malloc import trim
    except ImportError:
        trim = _ctypes_trim
    return trim()


async def release_free_memory_forever(interval: float = TRIM_INTERVAL) -> None:
    """:func:`release_free_memory` every ``interval`` seconds, until cancelled."""
    while True:
        await asyncio.sleep(interval)
        release_free_memory()


def _ctypes_trim() -> bool:
    """``tunnel.ops._malloc.trim`` through ctypes."""
    try:
        os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError):
        return False
    import ctypes

    try:
        return bool(ctypes.CDLL(None).malloc_trim(0))
    except (OSError, AttributeError):
        return False


def _ctypes_tune_malloc(mmap_threshold: int, trim_threshold: int) -> bool:
    """``tunnel.ops._malloc.tune_malloc`` through ctypes."""
    try:
        os.confstr("CS_GNU_LIBC_VERSION")  # the mallopt parameters below are glibc's
    except (ValueError, OSError):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h>
    return mallopt(m_mmap_threshold, mmap_threshold) == 1 and mallopt(m_trim_threshold, trim_threshold) == 1
