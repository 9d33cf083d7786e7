"""The WAN path: two network namespaces joined by the packet forwarder of ``forwarder.c``.

::

    namespace A (relay side)                                   namespace B (agent side)
    wan0 10.201.0.1  <-- TUN -->  forwarder (C)  <-- TUN -->   wan0 10.201.0.2
                                  per direction: loss -> rate + drop-tail queue -> delay

:class:`WanPath` is a context manager: it builds the forwarder (gcc, once, into a cache
directory keyed by the source's hash), creates the namespaces, sets their sysctls (TCP
buffers, congestion control: inside the namespaces only), starts the forwarder, and gives the
devices their addresses and MTU; on exit, or on any failure half-way, it stops the forwarder
and deletes both namespaces (their devices and sockets go with them).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import selectors
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import netns

SOURCE = Path(__file__).with_name("forwarder.c")


class WanUnavailable(RuntimeError):
    """The testbed cannot run here (not root, no TUN device, no compiler...)."""


def unavailable_reason() -> str | None:
    """None when the testbed can run on this machine, else why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and TUN devices)"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun"
    for tool in ("ip", "sysctl"):
        if not shutil.which(tool):
            return f"{tool} not installed (iproute2, procps)"
    if not SOURCE.exists():
        return f"{SOURCE} is missing"
    if not _compiler() and not _cached_binary().exists():
        return "no C compiler (gcc) to build the forwarder"
    return _probe()


@functools.lru_cache(maxsize=1)
def _probe() -> str | None:
    """Make and delete a namespace once: root in a container without CAP_NET_ADMIN cannot."""
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR)
        os.close(fd)
        for name in netns.new_pair():
            netns.delete(name)
    except (OSError, netns.NetnsError) as e:
        return f"cannot make network namespaces or TUN devices here: {str(e).splitlines()[0]}"
    return None


def cache_dir() -> Path:
    """Where the built forwarder is kept: ``$TUNNEL_BENCH_CACHE``, else ``~/.cache/tunnel-bench``."""
    base = os.environ.get("TUNNEL_BENCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tunnel-bench")
    return Path(base)


def _compiler() -> str | None:
    return shutil.which("gcc") or shutil.which("cc")


def _cached_binary() -> Path:
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    return cache_dir() / f"wan-forwarder-{digest}"


def build_forwarder() -> Path:
    """The forwarder executable, compiled on first use (safe when runs race to build it)."""
    exe = _cached_binary()
    if exe.exists():
        return exe
    cc = _compiler()
    if not cc:
        raise WanUnavailable("no C compiler (gcc) to build the forwarder")
    exe.parent.mkdir(parents=True, exist_ok=True)
    tmp = exe.with_name(f"{exe.name}.{os.getpid()}.tmp")
    cp = subprocess.run([cc, "-O2", "-Wall", "-Wextra", "-o", str(tmp), str(SOURCE)],
                        capture_output=True, text=True, timeout=120)
    if cp.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise WanUnavailable(f"building the forwarder failed: {cp.stderr.strip()[-600:]}")
    os.replace(tmp, exe)
    return exe


@dataclass(frozen=True)
class Direction:
    """What one direction of the path does to packets."""

    delay_ms: float = 0.0
    rate_mbit: float = 0.0      # 0: no rate limit
    loss: float = 0.0           # fraction of packets dropped at random, 0..1
    queue_bytes: int = 0        # bottleneck queue; 0: one bandwidth-delay product (see PathSpec)

    def __post_init__(self) -> None:
        if not 0.0 <= self.loss < 1.0:
            raise ValueError(f"loss must be a fraction in [0, 1), got {self.loss}")
        if self.delay_ms < 0 or self.rate_mbit < 0 or self.queue_bytes < 0:
            raise ValueError("delay, rate and queue must not be negative")


@dataclass(frozen=True)
class PathSpec:
    """Both directions (A -> B and B -> A) and what the namespaces' kernels use."""

    a2b: Direction
    b2a: Direction
    seed: int = 1
    mtu: int = 1500
    # TCP congestion control inside the namespaces; None keeps the host's default. A namespace
    # may only pick one of the host's net.ipv4.tcp_allowed_congestion_control (a global
    # setting this testbed does not touch).
    congestion_control: str | None = None

    @classmethod
    def symmetric(cls, rtt_ms: float = 50.0, rate_mbit: float = 1000.0, loss: float = 0.0,
                  queue_bytes: int = 0, **kwargs) -> "PathSpec":
        d = Direction(rtt_ms / 2, rate_mbit, loss, queue_bytes)
        return cls(d, d, **kwargs)

    @property
    def rtt_ms(self) -> float:
        return self.a2b.delay_ms + self.b2a.delay_ms

    def queue_of(self, d: Direction) -> int:
        """The bottleneck queue of ``d`` in bytes: as given, else one BDP (rate x RTT)."""
        if d.queue_bytes:
            return d.queue_bytes
        bdp = int(d.rate_mbit * 1e6 / 8 * self.rtt_ms / 1e3)
        return max(bdp, 16 * self.mtu)

    def describe(self) -> str:
        def one(d: Direction) -> str:
            rate = f"{d.rate_mbit:g} Mbit/s, queue {self.queue_of(d) / 1e6:.2f} MB" \
                if d.rate_mbit else "no rate limit"
            return f"+{d.delay_ms:g} ms, {rate}, {d.loss * 100:g} % loss"
        if self.a2b == self.b2a:
            return f"{self.rtt_ms:g} ms round trip; each way {one(self.a2b)}; MTU {self.mtu}"
        return f"A->B {one(self.a2b)}; B->A {one(self.b2a)}; MTU {self.mtu}"


# TCP buffers large enough for one BDP at 1 Gbit/s x 50 ms (6.25 MB) with room to spare, set
# inside the namespaces only. net.core.rmem_max/wmem_max (explicit SO_RCVBUF/SO_SNDBUF) are
# not per namespace and stay as the host has them.
def namespace_sysctls(spec: PathSpec) -> dict[str, str]:
    settings = {
        "net.ipv4.tcp_rmem": "4096 131072 67108864",
        "net.ipv4.tcp_wmem": "4096 16384 67108864",
        "net.ipv4.tcp_no_metrics_save": "1",       # no ssthresh carried from one run to the next
        "net.ipv6.conf.all.disable_ipv6": "1",     # no router solicitations on the path
        "net.ipv6.conf.default.disable_ipv6": "1",
    }
    if spec.congestion_control:
        settings["net.ipv4.tcp_congestion_control"] = spec.congestion_control
    return settings


def congestion_control_in(ns: str) -> str:
    """The TCP congestion control in force inside ``ns``."""
    return netns.call_in(ns, lambda: Path("/proc/sys/net/ipv4/tcp_congestion_control")
                         .read_text().strip())


@dataclass
class WanPath:
    """Namespaces ``ns_a`` (address ``addr_a``) and ``ns_b`` (``addr_b``) joined by the
    forwarder; use as a context manager."""

    spec: PathSpec
    log_path: Path | None = None
    addr_a: str = "10.201.0.1"
    addr_b: str = "10.201.0.2"
    dev: str = "wan0"
    ns_a: str = ""
    ns_b: str = ""
    proc: subprocess.Popen | None = None
    final_stats: dict | None = None
    _buf: bytearray = field(default_factory=bytearray)

    def __enter__(self) -> "WanPath":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def forwarder_argv(self, exe: Path) -> list[str]:
        argv = [str(exe), "--ns-a", str(netns.NETNS_DIR / self.ns_a),
                "--ns-b", str(netns.NETNS_DIR / self.ns_b), "--dev", self.dev,
                "--seed", str(self.spec.seed), "--burst-bytes", str(self.spec.mtu)]
        for name, d in (("a2b", self.spec.a2b), ("b2a", self.spec.b2a)):
            argv += [f"--{name}-delay-us", str(round(d.delay_ms * 1000)),
                     f"--{name}-rate-bps", str(round(d.rate_mbit * 1e6)),
                     f"--{name}-loss", repr(d.loss),
                     f"--{name}-queue-bytes", str(self.spec.queue_of(d))]
        return argv

    def start(self) -> None:
        reason = unavailable_reason()
        if reason:
            raise WanUnavailable(reason)
        netns.remove_stale()
        exe = build_forwarder()
        self.ns_a, self.ns_b = netns.new_pair()
        try:
            for ns in (self.ns_a, self.ns_b):
                netns.sysctl(ns, namespace_sysctls(self.spec))
            log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
            try:
                self.proc = subprocess.Popen(self.forwarder_argv(exe), stdin=subprocess.DEVNULL,
                                             stdout=subprocess.PIPE, stderr=log,
                                             start_new_session=True)
            finally:
                if self.log_path:
                    log.close()
            line = self._readline(10.0)
            if line != "ready":
                raise netns.NetnsError(f"forwarder did not start (said {line!r}; exit "
                                       f"{self.proc.poll()}; log {self.log_path})")
            for ns, mine, peer in ((self.ns_a, self.addr_a, self.addr_b),
                                   (self.ns_b, self.addr_b, self.addr_a)):
                # A long transmit queue on the device: a forwarder descheduled for a few
                # milliseconds must not turn into losses nobody configured.
                netns.ip("link", "set", self.dev, "mtu", str(self.spec.mtu),
                         "txqueuelen", "10000", "up", netns=ns)
                netns.ip("addr", "add", mine, "peer", f"{peer}/32", "dev", self.dev, netns=ns)
        except BaseException:
            self.stop()
            raise

    def _readline(self, timeout: float) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    return ""
                chunk = os.read(fd, 65536)
                if not chunk:
                    return ""
                self._buf += chunk
        line, _, rest = bytes(self._buf).partition(b"\n")
        self._buf[:] = rest
        return line.decode(errors="replace").strip()

    def stats(self) -> dict:
        """The forwarder's counters per direction (``a2b``, ``b2a``): rx/tx packets and bytes,
        ``lost`` (random loss), ``queue_drops`` (bottleneck full), ``ring_drops``,
        ``write_errors``, ``max_backlog_bytes``."""
        if self.proc is None or self.proc.poll() is not None:
            raise netns.NetnsError("the forwarder is not running")
        self.proc.send_signal(signal.SIGUSR1)
        line = self._readline(5.0)
        if not line:
            raise netns.NetnsError("the forwarder did not report its counters")
        return json.loads(line)

    def device_drops(self) -> int:
        """Packets the kernel dropped at the two TUN devices (the forwarder fell behind):
        losses nobody configured; should stay 0."""
        total = 0
        for ns in (self.ns_a, self.ns_b):
            out = netns.ip("-s", "-j", "link", "show", self.dev, netns=ns)
            st = json.loads(out)[0].get("stats64", {})
            total += int(st.get("tx", {}).get("dropped", 0)) + int(st.get("rx", {}).get("dropped", 0))
        return total

    def forwarder_cpu_seconds(self) -> float:
        if self.proc is None:
            return 0.0
        try:
            f = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                line = self._readline(5.0)
                if line.startswith("{"):
                    self.final_stats = json.loads(line)
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.proc = None
        for ns in (self.ns_a, self.ns_b):
            if ns:
                netns.delete(ns)
        self.ns_a = self.ns_b = ""
