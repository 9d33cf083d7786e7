"""What receiving a datagram costs the event loop, one callback each or drained in batches.

A sender process blasts ``--count`` datagrams of ``--size`` bytes at a receiver on loopback
(paced by the receiver's acknowledgements, so that no socket buffer overflows); the receiver
reads them (1) through an asyncio datagram endpoint (``datagram_received`` once per datagram,
what the QUIC carrier and aioquic's asyncio API do), (2) from ``loop.add_reader`` draining
``recvfrom`` until ``EAGAIN`` (a batch per wake-up), and (3) the same with ``recvmsg`` and UDP
GRO (the kernel coalesces a burst into one buffer; Linux 5.0+). Prints the receiver's CPU
time per datagram, each mode run in turn ``--repeat`` times (A B C A B C ...), medians::

    python bench/udp_receive.py [--count 200000] [--size 1452] [--repeat 3] [--loop uvloop]

Set against aioquic's 80-100 µs of CPU per datagram received (bench/README.md, issue 23), this
says how much of a QUIC receiver's time batching the receive side can save.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import socket
import statistics
import struct
import sys

UDP_GRO = 104  # linux/udp.h
ACK_EVERY = 256
BATCH = 64


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _sender(port: int, count: int, size: int, ack_port: int) -> None:
    """Child process: sends ``count`` datagrams, at most 4 x ACK_EVERY ahead of the receiver."""
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    out.connect(("127.0.0.1", port))
    acks = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    acks.bind(("127.0.0.1", ack_port))
    payload = b"\0" * size
    acked = 0
    for sent in range(count):
        while sent - acked >= 4 * ACK_EVERY:
            acked = struct.unpack("!Q", acks.recv(8))[0]
        out.send(payload)
    os._exit(0)


async def _receive(mode: str, sock: socket.socket, count: int, ack: socket.socket) -> float:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    state = {"got": 0}

    def counted(n: int) -> None:
        before = state["got"]
        state["got"] += n
        if state["got"] // ACK_EVERY != before // ACK_EVERY:
            try:
                ack.send(struct.pack("!Q", state["got"]))
            except OSError:  # the sender sent everything and left
                pass
        if state["got"] >= count and not done.done():
            done.set_result(None)

    cpu0 = _cpu()
    if mode == "callback":
        class Protocol(asyncio.DatagramProtocol):
            def datagram_received(self, data, addr):
                counted(1)

        transport, _ = await loop.create_datagram_endpoint(Protocol, sock=sock)
        await done
        transport.close()
    else:
        gro = mode == "gro"
        if gro:
            sock.setsockopt(socket.IPPROTO_UDP, UDP_GRO, 1)

        def readable() -> None:
            for _ in range(BATCH):
                try:
                    if gro:
                        data, ancdata, _, _ = sock.recvmsg(65535, socket.CMSG_SPACE(4))
                        segment = next((struct.unpack("=i", d[:4])[0] for level, kind, d in ancdata
                                        if level == socket.IPPROTO_UDP and kind == UDP_GRO), len(data))
                        n = -(-len(data) // segment) if segment else 1
                        for offset in range(0, len(data), segment or len(data) or 1):
                            memoryview(data)[offset:offset + segment]  # what a consumer would slice
                    else:
                        sock.recvfrom(65535)
                        n = 1
                except BlockingIOError:
                    return
                counted(n)

        loop.add_reader(sock.fileno(), readable)
        await done
        loop.remove_reader(sock.fileno())
    return (_cpu() - cpu0) / count * 1e6


def one_run(mode: str, count: int, size: int) -> float:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    ack = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    ack_port = probe.getsockname()[1]
    probe.close()
    pid = os.fork()
    if pid == 0:
        _sender(sock.getsockname()[1], count, size, ack_port)
    ack.connect(("127.0.0.1", ack_port))
    try:
        return asyncio.run(_receive(mode, sock, count, ack))
    finally:
        os.waitpid(pid, 0)
        sock.close()
        ack.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--size", type=int, default=1452)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="uvloop")
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    modes = ("callback", "batch", "gro") if sys.platform.startswith("linux") else ("callback", "batch")
    results: dict[str, list[float]] = {mode: [] for mode in modes}
    print(f"# {args.loop}, {args.count} datagrams of {args.size} B; load average {os.getloadavg()[0]:.2f}")
    for rep in range(args.repeat):
        for mode in modes:
            results[mode].append(one_run(mode, args.count, args.size))
            print(f"{rep} {mode:8} {results[mode][-1]:.2f} µs CPU per datagram", flush=True)
    print(f"# load average at the end {os.getloadavg()[0]:.2f}")
    for mode, values in results.items():
        print(f"| {mode} | {statistics.median(values):.2f} µs |")


if __name__ == "__main__":
    main()
