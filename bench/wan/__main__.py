"""Check that a WAN path delivers what it is asked to, and find the forwarder's ceiling.

    python -m bench.wan                              # 50 ms, 1 Gbit/s at 0, 0.1 and 1 % loss
    python -m bench.wan --rtt 20 --rate 100 --loss 0.5 --seconds 5
    python -m bench.wan --ceiling                    # no delay, no rate limit: how fast it goes

For each path: the round trip of small UDP datagrams on the idle path (what ping would
show), then one ``iperf3`` TCP stream from namespace A to B straight across the path, with
the loss each direction really saw, the bottleneck's drops and the forwarder's CPU.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.peers.clients import iperf3_argv, parse_iperf3  # noqa: E402
from bench.peers.procs import wait_listening  # noqa: E402
from bench.wan.netns import call_in, exec_argv  # noqa: E402
from bench.wan.path import (PathSpec, WanPath, congestion_control_in,  # noqa: E402
                            namespace_sysctls, unavailable_reason)

PORT = 5201


def udp_round_trips(path: WanPath, count: int = 20) -> list[float]:
    """Milliseconds of ``count`` sequential 64-byte UDP round trips A -> B -> A."""
    server = call_in(path.ns_b, socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    server.bind((path.addr_b, PORT))
    server.settimeout(5)
    client = call_in(path.ns_a, socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(5)
    out = []
    try:
        for i in range(count):
            msg = i.to_bytes(4, "big") * 16
            t0 = time.perf_counter()
            client.sendto(msg, (path.addr_b, PORT))
            data, addr = server.recvfrom(100)
            server.sendto(data, addr)
            while client.recv(100) != msg:   # a late answer to an earlier probe (lost ones)
                pass
            out.append((time.perf_counter() - t0) * 1000)
    except socket.timeout:
        pass  # a probe lost on a lossy path: keep what we have
    finally:
        server.close()
        client.close()
    return out


def one_stream(path: WanPath, seconds: int) -> dict:
    server = subprocess.Popen(exec_argv(path.ns_b, ["iperf3", "-s", "-B", path.addr_b,
                                                    "-p", str(PORT)]),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(PORT, 10, server, "iperf3 server", netns=path.ns_b)
        before, c0, t0 = path.stats(), path.forwarder_cpu_seconds(), time.monotonic()
        cp = subprocess.run(exec_argv(path.ns_a, iperf3_argv(PORT, seconds, host=path.addr_b)),
                            capture_output=True, text=True, timeout=seconds + 60)
        after, c1, t1 = path.stats(), path.forwarder_cpu_seconds(), time.monotonic()
        r = parse_iperf3(cp.stdout, cp.stderr, cp.returncode)
    finally:
        server.kill()
        server.wait(5)
    seen = {}
    for d in ("a2b", "b2a"):
        rx = after[d]["rx_packets"] - before[d]["rx_packets"]
        seen[d] = {"packets_per_s": rx / (t1 - t0),
                   "loss": (after[d]["lost"] - before[d]["lost"]) / rx if rx else 0.0,
                   "queue_drops": after[d]["queue_drops"] - before[d]["queue_drops"],
                   "max_backlog": after[d]["max_backlog_bytes"]}
    return {"mbit": r.bits_per_second / 1e6, "retransmits": r.retransmits,
            "forwarder_cpu": (c1 - c0) / (t1 - t0), "dirs": seen}


def check(spec: PathSpec, seconds: int) -> None:
    with WanPath(spec) as path:
        rtts = udp_round_trips(path)
        s = one_stream(path, seconds)
        drops = path.device_drops()
        cc = congestion_control_in(path.ns_a)
    print(f"\n{spec.describe()} (TCP congestion control {cc})")
    if rtts:
        print(f"  idle round trip, 64 B UDP: min {min(rtts):.2f} ms, median "
              f"{statistics.median(rtts):.2f} ms ({len(rtts)} probes)")
    print(f"  iperf3, 1 TCP stream A->B, {seconds}s: {s['mbit']:,.0f} Mbit/s, "
          f"{s['retransmits']} retransmits; forwarder CPU {s['forwarder_cpu'] * 100:.0f} % of a "
          f"core; unplanned drops at the devices: {drops}")
    for d, v in s["dirs"].items():
        print(f"  {d}: {v['packets_per_s']:,.0f} packets/s, loss seen {v['loss'] * 100:.3f} %, "
              f"queue drops {v['queue_drops']}, largest queue {v['max_backlog'] / 1e6:.2f} MB")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rtt", type=float, default=50.0, help="round trip, ms")
    ap.add_argument("--rate", type=float, default=1000.0, help="bottleneck, Mbit/s (0: none)")
    ap.add_argument("--loss", default="0,0.1,1", help="comma list of loss rates, percent")
    ap.add_argument("--queue", type=int, default=0, help="queue bytes (default: one BDP)")
    ap.add_argument("--cc", help="TCP congestion control in the namespaces (default: host's)")
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--ceiling", action="store_true",
                    help="the forwarder's ceiling: no rate limit, no loss, 0 and 50 ms")
    args = ap.parse_args(argv)
    why = unavailable_reason()
    if why:
        print(f"WAN testbed unavailable: {why}", file=sys.stderr)
        return 2
    print("sysctls inside both namespaces: " + ", ".join(
        f"{k}={v}" for k, v in namespace_sysctls(PathSpec.symmetric(congestion_control=args.cc)).items()))
    if args.ceiling:
        for rtt in (0.0, 50.0):
            check(PathSpec.symmetric(rtt, 0.0, 0.0, congestion_control=args.cc), args.seconds)
        return 0
    for loss in (float(x) / 100 for x in args.loss.split(",")):
        check(PathSpec.symmetric(args.rtt, args.rate, loss, args.queue,
                                 congestion_control=args.cc), args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
