"""Network namespaces for the WAN testbed: create, delete, run code or commands inside.

Namespaces are named ``tn-wan-<pid>-<n>-<side>`` after the process that made them, so runs in
parallel never collide, and :func:`remove_stale` can delete those a killed run left behind
(their pid is gone). Commands run inside with ``ip netns exec``; Python code runs inside with
:func:`call_in`, on a thread of its own that ``setns(2)``-es into the namespace (a network
namespace is per thread, and sockets stay in the namespace they were created in).
"""

from __future__ import annotations

import ctypes
import itertools
import os
import re
import subprocess
import threading
from pathlib import Path
from typing import Callable, TypeVar

IP = "ip"
NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
_NAME = re.compile(r"^tn-wan-(\d+)-\d+-[ab]$")
_counter = itertools.count(1)
_libc = ctypes.CDLL(None, use_errno=True)

T = TypeVar("T")


class NetnsError(RuntimeError):
    """A namespace could not be made, configured or entered."""


def ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    """Run ``ip [-n NETNS] ARGS``; raise :class:`NetnsError` with its message on failure."""
    argv = [IP] + (["-n", netns] if netns else []) + list(args)
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    if check and cp.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: {(cp.stderr or cp.stdout).strip()}")
    return cp.stdout


def exec_argv(netns: str | None, argv: list[str]) -> list[str]:
    """``argv`` prefixed to run inside ``netns`` (unchanged for None: the current namespace)."""
    return [IP, "netns", "exec", netns, *argv] if netns else list(argv)


def sysctl(netns: str, settings: dict[str, str]) -> None:
    """Write ``settings`` (``net.ipv4.tcp_rmem`` style keys) inside ``netns``."""
    argv = exec_argv(netns, ["sysctl", "-q", "-w"] + [f"{k}={v}" for k, v in settings.items()])
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    if cp.returncode != 0:
        raise NetnsError(f"sysctl in {netns}: {(cp.stderr or cp.stdout).strip()}")


def new_pair() -> tuple[str, str]:
    """Create two fresh namespaces (loopback up) and return their names."""
    n = next(_counter)
    names = (f"tn-wan-{os.getpid()}-{n}-a", f"tn-wan-{os.getpid()}-{n}-b")
    made: list[str] = []
    try:
        for name in names:
            ip("netns", "add", name)
            made.append(name)
            ip("link", "set", "lo", "up", netns=name)
    except NetnsError:
        for name in made:
            delete(name)
        raise
    return names


def delete(name: str) -> None:
    """Delete a namespace (its devices and sockets go with it); quiet when already gone."""
    ip("netns", "delete", name, check=False)


def remove_stale() -> list[str]:
    """Delete testbed namespaces whose creating process no longer exists."""
    removed = []
    try:
        names = [p.name for p in NETNS_DIR.iterdir()]
    except OSError:
        return removed
    for name in names:
        m = _NAME.match(name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            delete(name)
            removed.append(name)
    return removed


def _enter(name: str) -> None:
    fd = os.open(NETNS_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetnsError(f"setns into {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


def call_in(netns: str | None, fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` run inside ``netns`` (on a thread of its own) and its result;
    its exception is raised here. ``None`` runs it here, in the current namespace."""
    if netns is None:
        return fn(*args, **kwargs)
    box: dict[str, object] = {}

    def target() -> None:
        try:
            _enter(netns)
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            box["error"] = exc

    t = threading.Thread(target=target, name=f"in-{netns}", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]
