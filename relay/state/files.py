"""Files of the state directory: the directory itself (mode 0700) and private files written
atomically (mode 0600). Below the store, which keeps its SQLite database there."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path


def ensure_state_dir(path: str | os.PathLike) -> Path:
    """Create the state directory (mode 0700) if needed; tighten it when others can read it."""
    directory = Path(path)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = directory.stat()
    if st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(directory, 0o700)
    return directory


def write_private(path: str | os.PathLike, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` atomically (temp file + rename) with ``mode`` from the first byte on."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
