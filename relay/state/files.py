"""Files of the state directory: the directory itself (mode 0700) and private files written
atomically (mode 0600). Below the store, which keeps its SQLite database there."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from tunnel.ops.files import write_private

__all__ = ["ensure_state_dir", "write_private"]


def ensure_state_dir(path: str | os.PathLike) -> Path:
    """Create the state directory (mode 0700) if needed; tighten it when others can read it."""
    directory = Path(path)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = directory.stat()
    if st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(directory, 0o700)
    return directory


