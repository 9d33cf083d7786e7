"""The WAN section of ``bench/e2e.py``: every system through the same packet-level path.

For each loss rate, one :class:`~bench.wan.path.WanPath` (50 ms round trip, 1 Gbit/s,
bottleneck queue of one BDP by default); for each system, inside it:

    namespace A (relay side)                             namespace B (agent side)
    worker: iperf3 -c, round-trip probe                  iperf3 -s, echo server
    relay / sshd  <========== the path ==========>       agent / ssh -R client (one link)
    direct: the worker reaches B's services through the path itself

and two measurements: **one stream** (``iperf3 -t N`` worker -> service, receiver side) and
**head-of-line blocking**: 64-byte round trips on one stream while another stream on the same
link (the same agent, the same ``ssh`` connection; for direct, the same bottleneck) moves bulk
data. The path's own counters (packets lost, dropped at the queue or, unplanned, at the
devices) are kept beside the figures.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bench.peers import clients
from bench.peers.ours import OurRelay
from bench.peers.procs import LOOPBACK, HarnessError, ProcessRegistry, cpu_seconds
from bench.peers.services import start_echo, start_iperf
from bench.peers.sshd import PrivateSshd

from .netns import call_in
from .path import PathSpec, WanPath, congestion_control_in

SSH_CIPHERS = {"ssh-default": None, "ssh-aes128gcm": "aes128-gcm@openssh.com"}
OUR_TRANSPORTS = {"tunnel-wss": "wss", "tunnel-quic": "quic"}


@dataclass
class WanSettings:
    rtt_ms: float = 50.0
    rate_mbit: float = 1000.0
    losses: tuple[float, ...] = (0.0, 0.001, 0.01)   # fractions
    tput_seconds: int = 10
    hol_seconds: int = 20         # the bulk stream's duration
    hol_warmup: float = 3.0       # round trips start this long after the bulk stream
    congestion_control: str | None = None
    seed: int = 1

    def spec(self, loss: float) -> PathSpec:
        return PathSpec.symmetric(self.rtt_ms, self.rate_mbit, loss, seed=self.seed,
                                  congestion_control=self.congestion_control)


def loss_label(loss: float) -> str:
    return f"{loss * 100:g}%"


def metric_keys(loss: float) -> dict[str, tuple[str, str, bool]]:
    """``key -> (label, unit, higher_is_better)`` of the WAN metrics at ``loss``."""
    tag = loss_label(loss)
    return {
        f"wan_tput@{tag}": (f"WAN {tag} loss: 1 stream", "Mbit/s", True),
        f"wan_hol_p50@{tag}": (f"WAN {tag} loss: 64 B round trip beside bulk, p50", "ms", False),
        f"wan_hol_p99@{tag}": (f"WAN {tag} loss: 64 B round trip beside bulk, p99", "ms", False),
    }


@dataclass
class Endpoints:
    """Where the worker (namespace A) reaches the iperf3 and echo services."""

    iperf: tuple[str, int]
    echo: tuple[str, int]
    agent_pid: int | None = None
    stop: list[Callable[[], None]] = field(default_factory=list)


def expose(system: str, path: WanPath, reg: ProcessRegistry, tmp: Path, iperf_port: int,
           echo_port: int) -> Endpoints:
    """Set ``system`` up across ``path`` for the two services running in namespace B."""
    if system == "direct":
        return Endpoints((path.addr_b, iperf_port), (path.addr_b, echo_port))
    stops: list[Callable[[], None]] = []
    try:
        if system in SSH_CIPHERS:
            sshd = PrivateSshd(reg, tmp / "sshd", host=path.addr_a, netns=path.ns_a)
            stops.append(sshd.stop)
            sshd.start()
            (ip_ep, echo_ep), proc = sshd.forward_many([iperf_port, echo_port],
                                                       SSH_CIPHERS[system], name="ssh-wan",
                                                       netns=path.ns_b)
        elif system in OUR_TRANSPORTS:
            relay = OurRelay(reg, tmp / "relay-state", host=path.addr_a, netns=path.ns_a)
            stops.append(relay.stop)
            relay.start()
            ports, proc = relay.expose_many({"wan-iperf": iperf_port, "wan-echo": echo_port},
                                            OUR_TRANSPORTS[system], agent_netns=path.ns_b)
            ip_ep, echo_ep = ports["wan-iperf"], ports["wan-echo"]
        else:
            raise HarnessError(f"unknown system {system}")
    except BaseException:
        for stop in stops:
            stop()
        raise
    stops.insert(0, lambda: reg.stop(proc))
    return Endpoints((LOOPBACK, ip_ep), (LOOPBACK, echo_ep), proc.pid, stops)


def _path_delta(before: dict, after: dict) -> dict:
    out = {}
    for d in ("a2b", "b2a"):
        rx = after[d]["rx_packets"] - before[d]["rx_packets"]
        lost = after[d]["lost"] - before[d]["lost"]
        out[d] = {"packets": rx, "lost": lost, "queue_drops": after[d]["queue_drops"]
                  - before[d]["queue_drops"], "loss_observed": round(lost / rx, 5) if rx else 0.0}
    return out


def _bulk_beside(reg: ProcessRegistry, ep: Endpoints, path: WanPath,
                 st: WanSettings) -> tuple[clients.RttResult, clients.IperfResult]:
    """Round trips on the echo stream while iperf3 moves bulk data on the same link."""
    argv = clients.iperf3_argv(ep.iperf[1], st.hol_seconds, host=ep.iperf[0])
    deadline = time.monotonic() + 15
    while True:
        bulk = reg.spawn(argv, "iperf3-wan-bulk", capture=True, netns=path.ns_a)
        try:
            bulk.wait(st.hol_warmup)
        except subprocess.TimeoutExpired:
            break  # still running: the bulk stream is flowing
        out, err = bulk.communicate()
        reg.stop(bulk)
        try:
            clients.parse_iperf3(out.decode(errors="replace"), err.decode(errors="replace"),
                                 bulk.returncode)
            raise HarnessError("the bulk stream ended during its warm-up")
        except clients.IperfBusy:
            if time.monotonic() > deadline:
                raise HarnessError("iperf3: the server stayed busy") from None
            time.sleep(0.5)
    try:
        probe_seconds = max(1.0, st.hol_seconds - st.hol_warmup - 1.0)
        rtt = call_in(path.ns_a, clients.round_trips, ep.echo[1], count=1_000_000, warmup=3,
                      max_seconds=probe_seconds, host=ep.echo[0])
        out, err = bulk.communicate(timeout=st.hol_seconds + 40)
    except subprocess.TimeoutExpired:
        raise HarnessError("the bulk stream did not finish") from None
    finally:
        reg.stop(bulk)
    return rtt, clients.parse_iperf3(out.decode(errors="replace"), err.decode(errors="replace"),
                                     bulk.returncode)


def measure(systems: list[str], st: WanSettings, reg: ProcessRegistry,
            put: Callable[[str, str, float], None], say: Callable[[str, str], None],
            errors: list[str]) -> dict:
    """Run the WAN matrix; figures go to ``put(system, key, value)``; returns what the path
    and the runs looked like (for the results' metadata)."""
    info: dict = {"paths": {}, "runs": []}
    for loss in st.losses:
        keys = list(metric_keys(loss))
        spec = st.spec(loss)
        with WanPath(spec, log_path=reg.log_dir / f"forwarder-{loss_label(loss)}.log") as path:
            info["paths"][loss_label(loss)] = spec.describe()
            info["congestion_control"] = congestion_control_in(path.ns_a)
            for system in systems:
                tag = f"{system} @{loss_label(loss)}"
                tmp = Path(tempfile.mkdtemp(prefix=f"wan-{system}-", dir=reg.log_dir))
                run = {"system": system, "loss": loss}
                svc = []
                ep: Endpoints | None = None
                drops0 = path.device_drops()
                try:
                    say(tag, f"WAN path: {spec.describe()}; setting up {system} across it")
                    iperf_port, p1 = start_iperf(reg, host="0.0.0.0", netns=path.ns_b)
                    echo_port, p2 = start_echo(reg, host="0.0.0.0", netns=path.ns_b)
                    svc = [p1, p2]
                    ep = expose(system, path, reg, tmp, iperf_port, echo_port)

                    say(tag, f"one stream, iperf3 {st.tput_seconds}s")
                    before, f0 = path.stats(), path.forwarder_cpu_seconds()
                    a0 = cpu_seconds(ep.agent_pid) if ep.agent_pid else 0.0
                    r = clients.iperf3(reg, ep.iperf[1], st.tput_seconds, host=ep.iperf[0],
                                       netns=path.ns_a, name="iperf3-wan")
                    after = path.stats()
                    put(system, keys[0], r.bits_per_second / 1e6)
                    run.update(tput_mbit=round(r.bits_per_second / 1e6, 1),
                               retransmits=r.retransmits, path=_path_delta(before, after),
                               forwarder_cpu_share=round((path.forwarder_cpu_seconds() - f0)
                                                         / max(r.seconds, 1e-9), 2))
                    if ep.agent_pid:
                        run["agent_cpu_share"] = round((cpu_seconds(ep.agent_pid) - a0)
                                                       / max(r.seconds, 1e-9), 2)
                    seen = run["path"]["a2b"]
                    say(tag, f"  1 stream = {r.bits_per_second / 1e6:,.0f} Mbit/s (path A->B: "
                             f"{seen['loss_observed'] * 100:.2f} % lost, {seen['queue_drops']} "
                             f"queue drops; forwarder {run['forwarder_cpu_share'] * 100:.0f} % "
                             f"of a core; agent {run.get('agent_cpu_share', 0) * 100:.0f} %)")

                    say(tag, f"64 B round trips beside a bulk stream, {st.hol_seconds}s")
                    rtt, bulk = _bulk_beside(reg, ep, path, st)
                    put(system, keys[1], rtt.p50_us / 1000)
                    put(system, keys[2], rtt.p99_us / 1000)
                    run.update(hol_samples=rtt.count, hol_bulk_mbit=round(bulk.bits_per_second / 1e6, 1))
                    say(tag, f"  round trip p50 {rtt.p50_us / 1000:.1f} ms, p99 "
                             f"{rtt.p99_us / 1000:.1f} ms ({rtt.count} samples; bulk "
                             f"{bulk.bits_per_second / 1e6:,.0f} Mbit/s)")
                except HarnessError as e:
                    errors.append(f"{tag}: {e}")
                    run["error"] = str(e).splitlines()[0][:300]
                    say(tag, f"ERROR: {str(e).splitlines()[0][:200]}")
                finally:
                    if ep is not None:
                        for stop in ep.stop:
                            stop()
                    reg.stop_all(svc)
                    run["device_drops"] = path.device_drops() - drops0
                    if run["device_drops"]:
                        say(tag, f"  WARNING: {run['device_drops']} packets dropped at the TUN "
                                 "devices (the forwarder fell behind): losses nobody configured")
                    info["runs"].append(run)
    return info
