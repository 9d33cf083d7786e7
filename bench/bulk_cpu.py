"""CPU per GB of our relay and agent under one bulk stream over WSS (or QUIC), one source tree or several
interleaved (A/B), optionally with a profile of both.

    python bench/bulk_cpu.py                                         # this tree, 3 runs
    python bench/bulk_cpu.py --trees /tmp/base,. --runs 4            # A, B, A, B, ...
    python bench/bulk_cpu.py --trees .,.:ssl                         # TLS engines: openssl, ssl
    python bench/bulk_cpu.py --trees .,.+TUNNEL_LINK_NOTSENT_LOWAT=0  # one setting off
    python bench/bulk_cpu.py --trees /tmp/base:quic,.:quic,.         # QUIC old/new, WSS
    python bench/bulk_cpu.py --profile /tmp/prof --profiler perf     # where the CPU goes

Each run starts, from the tree under test (as ``bench/roundtrip_cpu.py`` does): a relay on
loopback, the bulk service (:mod:`bench.peers.bulk`), an agent over WSS serving it; then moves
``--mbytes`` through the relay's endpoint on one connection, upload (worker -> service: the agent
decrypts and writes to the service) and download (service -> worker: the agent reads and
encrypts), and reads utime+stime of the agent, the relay and the bulk service from
``/proc/PID/stat`` around each. Printed per run and direction: load average, Gbit/s, CPU s/GB
of agent and relay; then medians per tree. Throughput on a shared machine is noisy; CPU per GB
is the steadier figure.

The name ``ssh`` in ``--trees`` runs OpenSSH instead, in the same interleaving: ``ssh -R`` with
aes128-gcm through a private sshd (:mod:`bench.peers.sshd`); its client stands for the agent and
sshd (with its per-connection processes) for the relay.

A tree ``PATH:ssl`` runs with ``TUNNEL_TLS_ENGINE=ssl``, ``PATH:pure`` with the pure-Python
twins, ``PATH:quic`` with the agent on ``quic://``; ``PATH+NAME=VALUE`` (repeatable: ``.+A=1+B=2``) sets environment variables of relay and
agent.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.peers.procs import LOOPBACK, HarnessError, ProcessRegistry, cpu_seconds  # noqa: E402
from bench.peers.services import start_bulk  # noqa: E402
from bench.peers.sshd import PrivateSshd  # noqa: E402
from bench.roundtrip_cpu import Tree, profiler_argv, tunnel  # noqa: E402

CHUNK = memoryview(bytes(range(256)) * 4096)  # 1 MiB


class EnvTree(Tree):
    """A :class:`Tree` whose spec may end in ``+NAME=VALUE`` settings."""

    def __init__(self, spec: str) -> None:
        base, *sets = spec.split("+")
        super().__init__(base)
        self.extra = dict(s.split("=", 1) for s in sets)
        if sets:
            self.name += "+" + "+".join(sets)
            self.label += "+" + "+".join(sets)

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return super().env({**self.extra, **(extra or {})})


def upload(port: int, n: int) -> float:
    """Send ``n`` bytes to the bulk service; seconds until its count came back."""
    with socket.create_connection((LOOPBACK, port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.perf_counter()
        s.sendall(struct.pack(">cQ", b"U", n))
        left = n
        while left > 0:
            piece = CHUNK[:min(left, len(CHUNK))]
            s.sendall(piece)
            left -= len(piece)
        got = b""
        while len(got) < 8:
            more = s.recv(8 - len(got))
            if not more:
                raise HarnessError("bulk upload: connection closed before the count")
            got += more
        if struct.unpack(">Q", got)[0] != n:
            raise HarnessError("bulk upload: wrong count")
        return time.perf_counter() - t0


def download(port: int, n: int) -> float:
    """Receive ``n`` bytes from the bulk service; seconds until the last arrived."""
    buf = bytearray(1 << 20)
    with socket.create_connection((LOOPBACK, port)) as s:
        t0 = time.perf_counter()
        s.sendall(struct.pack(">cQ", b"D", n))
        got = 0
        while got < n:
            k = s.recv_into(buf)
            if not k:
                raise HarnessError(f"bulk download: closed after {got} of {n} bytes")
            got += k
        return time.perf_counter() - t0


class SshPeer:
    """``ssh -R`` aes128-gcm in place of relay and agent (see the module's docstring)."""

    name = label = "ssh-aes128gcm"

    def __init__(self, reg: ProcessRegistry) -> None:
        self.sshd = PrivateSshd(reg, Path(tempfile.mkdtemp(prefix="bulkcpu-sshd-")))
        self.sshd.start()


def _measure(ep: int, nbytes: int, agent_pid: int, relay_pid: int, relay_children: bool, service_pid: int) -> dict:
    out = {}
    for direction, move in (("up", upload), ("down", download)):
        def cpu() -> list[float]:
            return [cpu_seconds(agent_pid, False), cpu_seconds(relay_pid, relay_children),
                    cpu_seconds(service_pid, False)]
        c0 = cpu()
        secs = move(ep, nbytes)
        c1 = cpu()
        gb = nbytes / 1e9
        out[direction] = {"gbit": nbytes * 8 / secs / 1e9, "agent": (c1[0] - c0[0]) / gb,
                          "relay": (c1[1] - c0[1]) / gb, "service": (c1[2] - c0[2]) / gb}
    return out


def ssh_run(reg: ProcessRegistry, peer: SshPeer, bulk: tuple[int, subprocess.Popen], nbytes: int) -> dict:
    ep, client = peer.sshd.forward(bulk[0], "aes128-gcm@openssh.com", name="ssh-bulk")
    try:
        upload(ep, 64 << 20)
        return _measure(ep, nbytes, client.pid, peer.sshd.proc.pid, True, bulk[1].pid)
    finally:
        reg.stop(client)


def one_run(reg: ProcessRegistry, tree: Tree, bulk: tuple[int, subprocess.Popen], nbytes: int,
            profile: Path | None, profiler: str) -> dict:
    bulk_port, bulk_proc = bulk
    with tunnel(reg, tree, "bulk", bulk_port, "bulkcpu-") as (relay, agent, ep):
        upload(ep, 64 << 20)  # warm: first stream, windows, allocator
        out = {}
        for direction, move in (("up", upload), ("down", download)):
            spies = [] if profile is None else [
                subprocess.Popen(profiler_argv(profiler, profile / f"{tree.name}-{direction}-{name}", proc.pid),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                for name, proc in (("agent", agent), ("relay", relay))]
            if spies:
                time.sleep(0.5)  # let the profilers attach
            pids = (agent.pid, relay.pid, bulk_proc.pid)
            c0 = [cpu_seconds(p, False) for p in pids]
            secs = move(ep, nbytes)
            c1 = [cpu_seconds(p, False) for p in pids]
            for spy in spies:
                spy.send_signal(2)
                spy.wait(60)
            gb = nbytes / 1e9
            out[direction] = {"gbit": nbytes * 8 / secs / 1e9, "agent": (c1[0] - c0[0]) / gb,
                              "relay": (c1[1] - c0[1]) / gb, "service": (c1[2] - c0[2]) / gb}
        return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trees", default=".", help="comma list of source trees, run interleaved")
    ap.add_argument("--runs", type=int, default=3, help="runs per tree")
    ap.add_argument("--mbytes", type=int, default=1024, help="MiB per direction and run")
    ap.add_argument("--profile", type=Path, help="record profiles of agent and relay into this directory "
                    "(sampling costs CPU: such runs' figures are not comparable)")
    ap.add_argument("--profiler", choices=("py-spy", "perf", "perf-dwarf"), default="perf",
                    help="perf record -g (native and kernel frames), the same with DWARF unwinding "
                         "(callers of libc and OpenSSL too; large files) or py-spy --native")
    args = ap.parse_args(argv)
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    reg = ProcessRegistry(Path(tempfile.mkdtemp(prefix="bulkcpu-logs-")))
    keys = [(d, k) for d in ("up", "down") for k in ("gbit", "agent", "relay")]
    try:
        trees = [SshPeer(reg) if t == "ssh" else EnvTree(t) for t in args.trees.split(",")]
        results: dict[EnvTree | SshPeer, list[dict]] = {t: [] for t in trees}
        bulk = start_bulk(reg)
        for i in range(args.runs):
            for tree in trees:
                load = open("/proc/loadavg").read().split()[0]
                if isinstance(tree, SshPeer):
                    r = ssh_run(reg, tree, bulk, args.mbytes << 20)
                else:
                    r = one_run(reg, tree, bulk, args.mbytes << 20, args.profile, args.profiler)
                results[tree].append(r)
                print(f"run {i + 1} {tree.name:28s} load {load:>5s}  " + "  ".join(
                    f"{d}: {r[d]['gbit']:5.2f} Gbit/s agent {r[d]['agent']:.3f} relay {r[d]['relay']:.3f} s/GB"
                    for d in ("up", "down")), flush=True)
        print("medians (up = worker -> service, down = service -> worker):")
        for tree, rs in results.items():
            med = {(d, k): statistics.median(r[d][k] for r in rs) for d, k in keys}
            print(f"  {tree.label:48s} " + "  ".join(
                f"{d}: {med[d, 'gbit']:5.2f} Gbit/s agent {med[d, 'agent']:.3f} relay {med[d, 'relay']:.3f} s/GB"
                for d in ("up", "down")))
    finally:
        reg.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
