"""Reading the agent's config file again: :func:`watch_config` notices a changed file (once it
settled), :func:`read_config` loads it (agent.runner applies it on the live link).
"""

from __future__ import annotations

import asyncio
import logging
import os

from .config import AgentConfig, ConfigError

log = logging.getLogger("agent")

#: Most of a config file the watcher compares (a larger file is compared by its first MiB).
MAX_CONFIG_FILE = 1 << 20


async def watch_config(path: str, interval: float, reload, sleep=asyncio.sleep) -> None:
    """Call ``reload(why)`` whenever the file at ``path`` changes (checked every ``interval``).
    A change applies once two checks in a row find the same file (inode, mtime, size and
    content): a file being written in place is not applied half-written, as long as its
    writer pauses less than ``interval``. Writing a new file and renaming it into place is
    atomic (README, "Changing it while the agent runs")."""
    seen = _file_version(path)
    pending = None
    while True:
        await sleep(interval)
        version = _file_version(path)
        if version == seen:
            pending = None
        elif version != pending:
            pending = version  # changed since the last check: wait for it to settle
        else:
            seen, pending = version, None
            reload(f"{path} changed")


def read_config(old: AgentConfig, environ, why: str) -> AgentConfig | None:
    """``old``'s config file read again; None (logged) when there is none or it is refused."""
    from . import config as agent_config

    if not old.config_file:
        log.warning("%s: there is no config file to read again (the agent runs on environment variables); "
                    "restart it to change them", why)
        return None
    try:
        return agent_config.load(environ, old.config_file)
    except ConfigError as exc:
        log.error("%s: config file %s refused: %s; still running the previous configuration", why,
                  old.config_file, exc)
        return None


def _file_version(path: str):
    """What tells one state of a config file from another: its stat stamp and content digest."""
    import hashlib

    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read(MAX_CONFIG_FILE + 1)).digest()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size, digest

