"""Type stub of ``tunnel.ops._malloc`` (C, built from ``tunnel/ops/_malloc.c``)."""

def tune_malloc(mmap_threshold: int, trim_threshold: int) -> bool:
    """Set glibc's ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` (bytes); True if both were set,
    False where the C library is not glibc."""

def trim() -> bool:
    """Give the heap's free pages back to the system (glibc ``malloc_trim(0)``); True if any
    were, False where none were or the C library is not glibc."""
