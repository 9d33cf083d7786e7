"""Processes, ports and /proc sampling for the benchmark harness.

Every process the harness starts goes through :class:`ProcessRegistry.spawn`, which puts it in
its own session (process group) so that it and all its children can be ended together, and
remembers it so that :meth:`ProcessRegistry.close` (called from ``finally`` blocks, ``atexit``
and the SIGTERM/SIGINT handlers) leaves nothing behind.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

REPO = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1"


class HarnessError(RuntimeError):
    """A peer could not be set up or a measurement could not be taken."""


def free_port(kind: int = socket.SOCK_STREAM, both: bool = False) -> int:
    """A currently free loopback port (TCP, or UDP, or free for both when ``both``)."""
    for _ in range(200):
        s = socket.socket(socket.AF_INET, kind)
        try:
            s.bind((LOOPBACK, 0))
            port = s.getsockname()[1]
        finally:
            s.close()
        if not both:
            return port
        other = socket.SOCK_DGRAM if kind == socket.SOCK_STREAM else socket.SOCK_STREAM
        s2 = socket.socket(socket.AF_INET, other)
        try:
            s2.bind((LOOPBACK, port))
            return port
        except OSError:
            continue
        finally:
            s2.close()
    raise HarnessError("no free loopback port")


def _listening_ports() -> set[int]:
    # thread-self: the calling thread's network namespace (see bench.wan.netns.call_in).
    ports: set[int] = set()
    for name in ("/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 3 and parts[3] == "0A":  # TCP_LISTEN
                ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


def is_listening(port: int, netns: str | None = None) -> bool:
    """True when some socket listens on TCP ``port`` (checked without connecting), in the
    network namespace ``netns`` (None: this one)."""
    if netns is None:
        return port in _listening_ports()
    from bench.wan.netns import call_in
    return port in call_in(netns, _listening_ports)


def wait_until(cond: Callable[[], object], timeout: float, what: str,
               alive: Callable[[], bool] | None = None, interval: float = 0.02) -> object:
    """Poll ``cond`` until it returns something truthy, or raise after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if alive is not None and not alive():
            raise HarnessError(f"process died while waiting for {what}")
        if time.monotonic() > deadline:
            raise HarnessError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def wait_listening(port: int, timeout: float = 10.0, proc: subprocess.Popen | None = None,
                   what: str = "", netns: str | None = None) -> None:
    alive = (lambda: proc.poll() is None) if proc is not None else None
    wait_until(lambda: is_listening(port, netns), timeout, what or f"port {port} to listen", alive,
               interval=0.05 if netns else 0.02)


def raise_fd_limit() -> None:
    """Raise RLIMIT_NOFILE to the hard limit (children inherit it): 1,000 streams need it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > 65536:
        hard = 65536
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def python_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    pp = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + pp if pp else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if extra:
        env.update(extra)
    return env


class ProcessRegistry:
    """Starts processes in their own process group and ends them all on close()."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._procs: list[subprocess.Popen] = []
        self._n = 0

    def spawn(self, argv: Sequence[str], name: str, env: dict[str, str] | None = None,
              cwd: Path | str | None = None, capture: bool = False,
              netns: str | None = None) -> subprocess.Popen:
        """Start ``argv`` (inside network namespace ``netns`` when given, by ``ip netns exec``,
        which execs it: the pid is the command's); stdout/stderr go to a log file (or a pipe
        when ``capture``)."""
        if netns:
            argv = ["ip", "netns", "exec", netns, *argv]
        self._n += 1
        log = self.log_dir / f"{self._n:03d}-{name}.log"
        out = subprocess.PIPE if capture else open(log, "wb")
        try:
            proc = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.PIPE if capture else subprocess.STDOUT,
                env=env, cwd=cwd, start_new_session=True)
        finally:
            if not capture:
                out.close()
        proc.log_path = log  # type: ignore[attr-defined]
        self._procs.append(proc)
        return proc

    def run(self, argv: Sequence[str], name: str, timeout: float, env: dict[str, str] | None = None,
            cwd: Path | str | None = None, netns: str | None = None) -> subprocess.CompletedProcess:
        """Run ``argv`` to completion (bounded by ``timeout``) and capture its output."""
        proc = self.spawn(argv, name, env=env, cwd=cwd, capture=True, netns=netns)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(proc)
            raise HarnessError(f"{name}: timed out after {timeout:.0f}s") from None
        finally:
            self._forget(proc)
        return subprocess.CompletedProcess(proc.args, proc.returncode,
                                           out.decode(errors="replace"),
                                           err.decode(errors="replace"))

    def _forget(self, proc: subprocess.Popen) -> None:
        try:
            self._procs.remove(proc)
        except ValueError:
            pass

    def stop(self, proc: subprocess.Popen, grace: float = 3.0) -> None:
        """SIGTERM the process group, then SIGKILL it if it lingers."""
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        # The group may outlive its leader (children); kill whatever is left of it.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        self._forget(proc)

    def stop_all(self, procs: Iterable[subprocess.Popen]) -> None:
        for p in list(procs):
            self.stop(p)

    def close(self) -> None:
        for proc in reversed(list(self._procs)):
            self.stop(proc, grace=2.0)


def install_signal_handlers() -> None:
    """Turn SIGTERM/SIGHUP into KeyboardInterrupt so ``finally`` blocks clean up."""
    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt(f"signal {signum}")
    # A shell starts background jobs with SIGINT ignored; Ctrl-C must still clean up.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            signal.signal(sig, handler)
        except (ValueError, OSError):
            pass


# ---------------------------------------------------------------------------------------------
# /proc sampling: RSS and CPU of a process and all its descendants.

CLK_TCK = os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """``pid`` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def rss_bytes(pid: int, include_children: bool = True) -> int:
    """VmRSS of ``pid`` (plus its descendants), in bytes."""
    total = 0
    for p in descendants(pid) if include_children else [pid]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total


def cpu_seconds(pid: int, include_children: bool = True) -> float:
    """utime+stime of ``pid`` (plus live descendants and reaped children), in seconds."""
    ticks = 0
    for p in descendants(pid) if include_children else [pid]:
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        f = stat[stat.rindex(")") + 2:].split()
        # fields after the comm: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14)
        ticks += int(f[11]) + int(f[12])
        if include_children:
            ticks += int(f[13]) + int(f[14])
    return ticks / CLK_TCK


def cpu_hz() -> float:
    """Nominal clock: lscpu's max MHz when known, else /proc/cpuinfo's "cpu MHz"."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        for line in out.splitlines():
            if line.lower().startswith("cpu max mhz"):
                return float(line.split(":", 1)[1]) * 1e6
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.split(":", 1)[1]) * 1e6
    except (OSError, ValueError):
        pass
    return 0.0


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def log_tail(proc: subprocess.Popen, n: int = 15) -> str:
    path = getattr(proc, "log_path", None)
    if path is None:
        return ""
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def python() -> str:
    return sys.executable
