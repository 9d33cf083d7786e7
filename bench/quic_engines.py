"""QUIC engines side by side: aioquic (pure or compiled) and qh3, each through its own asyncio API.

No tunnel code runs here: one bulk transfer (client -> server, one stream) and 64-byte round
trips on one stream, through each engine's own ``connect`` / ``serve`` (aioquic's plain asyncio
datagram endpoint; qh3's own transport, which batches with GSO/GRO where the kernel has them).
Server and client are separate processes; each reports its own CPU time (user + system) and
the datagrams it received, so the figures are CPU per GB and per datagram on each side.

A system is ``label=engine[@python]``: ``aioquic-pure=aioquic@/venv-pure/bin/python``,
``aioquic-cc=aioquic@/venv-compiled/bin/python`` (scripts/build_aioquic.py compiled it),
``qh3=qh3``. Runs are interleaved (A B C A B C ...) and the median of each is printed::

    python bench/quic_engines.py --systems aioquic=aioquic,qh3=qh3 --megabytes 256 --repeat 3
    python bench/quic_engines.py --wan --loss 0.01 ...   # the 50 ms / 1 Gbit/s path (root)
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHUNK = 64 * 1024
WINDOW = 16 * 1024 * 1024
ACK_EVERY = 1024 * 1024
ROUND_TRIPS = 200
HERE = Path(__file__).resolve().parent


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _modules(engine: str):
    asyncio_api = importlib.import_module(f"{engine}.asyncio")
    protocol = importlib.import_module(f"{engine}.asyncio.protocol")
    configuration = importlib.import_module(f"{engine}.quic.configuration")
    return asyncio_api, protocol.QuicConnectionProtocol, configuration.QuicConfiguration


def _configure(config, args) -> None:
    config.max_datagram_size = args.datagram_size
    # Windows of several BDPs (1 Gbit/s x 50 ms is 6.25 MB): flow control never the limit.
    config.max_data = 64 * 1024 * 1024
    config.max_stream_data = 32 * 1024 * 1024
    config.idle_timeout = 60.0
    if args.congestion and hasattr(config, "congestion_control_algorithm"):
        config.congestion_control_algorithm = args.congestion


def _counting(base):
    class Counting(base):
        datagrams = 0

        def connection_made(self, transport):
            # The socket buffers the tunnel's UDP layer asks for (tunnel/carriers/quic/udp.py):
            # the kernel's 208 KiB default drops bursts on a loaded machine.
            sock = transport.get_extra_info("socket")
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                sock.setsockopt(socket.SOL_SOCKET, option, 8 * 1024 * 1024)
            super().connection_made(transport)

        def datagram_received(self, data, addr):
            Counting.datagrams += 1
            super().datagram_received(data, addr)

    return Counting


async def _serve(args) -> None:
    api, protocol, Configuration = _modules(args.engine)
    config = Configuration(is_client=False, alpn_protocols=["bench"])
    _configure(config, args)
    config.load_cert_chain(args.cert, args.key)
    Counting = _counting(protocol)
    done = asyncio.get_running_loop().create_future()

    async def handle(reader, writer):
        first = await reader.readexactly(1)
        if first == b"B":  # bulk: read to the end, answer with our CPU and datagrams
            got, acked, cpu0, dgrams0 = 0, 0, _cpu(), Counting.datagrams
            while chunk := await reader.read(CHUNK * 4):
                got += len(chunk)
                if got - acked >= ACK_EVERY:  # the sender's window (see _client)
                    acked = got
                    writer.write(got.to_bytes(8, "big"))
            writer.write(json.dumps({"bytes": got, "cpu": _cpu() - cpu0,
                                     "datagrams": Counting.datagrams - dgrams0}).encode())
            writer.write_eof()
        else:  # round trips: echo 64-byte messages until the end
            while True:
                try:
                    message = await reader.readexactly(64)
                except asyncio.IncompleteReadError:
                    break
                writer.write(message)
            writer.write_eof()
            done.set_result(None)

    server = await api.serve(args.host, args.port, configuration=config,
                             stream_handler=lambda r, w: asyncio.ensure_future(handle(r, w)),
                             create_protocol=Counting)
    print("ready", flush=True)
    await done
    await asyncio.sleep(0.2)  # let the last echo and FIN leave
    server.close()


async def _client(args) -> dict:
    import ssl

    api, protocol, Configuration = _modules(args.engine)
    config = Configuration(is_client=True, alpn_protocols=["bench"])
    _configure(config, args)
    config.verify_mode = ssl.CERT_NONE
    Counting = _counting(protocol)
    result = {}
    async with api.connect(args.host, args.port, configuration=config, create_protocol=Counting) as client:
        reader, writer = await client.create_stream()
        payload = b"\0" * CHUNK
        total = args.megabytes * 1024 * 1024
        cpu0, start = _cpu(), time.perf_counter()
        writer.write(b"B")
        # Neither engine's stream writer pushes back (drain() returns at once), so the sender
        # keeps at most WINDOW bytes unacknowledged by the server's 8-byte receipts: bounded
        # buffers, and more than a 1 Gbit/s x 50 ms path holds.
        sent, acked = 0, 0
        while sent < total:
            while sent - acked >= WINDOW:
                acked = int.from_bytes(await reader.readexactly(8), "big")
            writer.write(payload)
            sent += CHUNK
        writer.write_eof()
        while True:
            head = await reader.readexactly(1)
            if head == b"{":
                break
            await reader.readexactly(7)
        server = json.loads(head + await reader.read())
        elapsed = time.perf_counter() - start
        if server["bytes"] != total:
            raise SystemExit(f"bulk: the server got {server['bytes']} of {total} bytes")
        gb = total / 1e9
        result.update(gbit_s=total * 8 / elapsed / 1e9, seconds=elapsed,
                      client_cpu_s_per_gb=(_cpu() - cpu0) / gb, server_cpu_s_per_gb=server["cpu"] / gb,
                      server_datagrams=server["datagrams"],
                      server_us_per_datagram=server["cpu"] / max(1, server["datagrams"]) * 1e6)
        reader, writer = await client.create_stream()
        writer.write(b"R")
        samples = []
        for _ in range(ROUND_TRIPS):
            t0 = time.perf_counter()
            writer.write(b"x" * 64)
            await reader.readexactly(64)
            samples.append((time.perf_counter() - t0) * 1000)
        writer.write_eof()
        samples.sort()
        result.update(rtt_p50_ms=samples[len(samples) // 2], rtt_p99_ms=samples[int(len(samples) * 0.99) - 1])
    return result


def _handshakes(args) -> dict:
    """CPU per handshake of the engine itself: client and server ``QuicConnection`` wired
    together in memory (no sockets, no event loop), until both report HandshakeCompleted."""
    connection = importlib.import_module(f"{args.engine}.quic.connection")
    events = importlib.import_module(f"{args.engine}.quic.events")
    _, _, Configuration = _modules(args.engine)
    import ssl

    server_config = Configuration(is_client=False, alpn_protocols=["bench"])
    server_config.load_cert_chain(args.cert, args.key)
    client_config = Configuration(is_client=True, alpn_protocols=["bench"], server_name="bench")
    client_config.verify_mode = ssl.CERT_NONE
    addr = ("127.0.0.1", 4433)
    cpu0 = _cpu()
    for i in range(args.handshakes):
        client = connection.QuicConnection(configuration=client_config)
        server = connection.QuicConnection(configuration=server_config,
                                           original_destination_connection_id=client.original_destination_connection_id)
        now = float(i)
        client.connect(addr, now=now)
        done = set()
        while len(done) < 2:
            moved = False
            for a, b, side in ((client, server, "s"), (server, client, "c")):
                for data, _ in a.datagrams_to_send(now=now):
                    b.receive_datagram(data, addr, now=now)
                    moved = True
            for conn, side in ((client, "c"), (server, "s")):
                while (event := conn.next_event()) is not None:
                    if isinstance(event, events.HandshakeCompleted):
                        done.add(side)
            if not moved and len(done) < 2:
                raise SystemExit("handshake stalled")
            now += 0.001
    return {"handshake_cpu_ms": (_cpu() - cpu0) / args.handshakes * 1000}


def _certificate(folder: str) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    cert_path, key_path = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    Path(cert_path).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    Path(key_path).write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
    return cert_path, key_path


def _free_udp_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _one_run(system: tuple[str, str, str], args, cert: tuple[str, str], path) -> dict:
    label, engine, python = system
    common = ["--engine", engine, "--loop", args.loop, "--datagram-size", str(args.datagram_size),
              "--megabytes", str(args.megabytes)]
    if args.congestion:
        common += ["--congestion", args.congestion]
    server_host, client_ns, server_ns = "127.0.0.1", None, None
    if path is not None:
        from bench.wan import netns

        server_host, server_ns, client_ns = path.addr_a, path.ns_a, path.ns_b
    wrap = (lambda ns, argv: argv) if path is None else (lambda ns, argv: netns.exec_argv(ns, argv))
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    port = str(_free_udp_port(server_host) if path is None else 4433)
    server = subprocess.Popen(wrap(server_ns, [python, __file__, "--role", "server", "--host", server_host,
                                               "--port", port, "--cert", cert[0], "--key", cert[1], *common]),
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        if server.stdout.readline().strip() != "ready":
            raise SystemExit(f"{label}: the server did not start")
        out = subprocess.run(wrap(client_ns, [python, __file__, "--role", "client", "--host", server_host,
                                              "--port", port, *common]),
                             capture_output=True, text=True, env=env, timeout=args.timeout)
        if out.returncode:
            raise SystemExit(f"{label}: client failed: {out.stderr[-2000:]}")
        server.wait(timeout=30)
        result = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    if args.handshakes:
        out = subprocess.run([python, __file__, "--role", "handshakes", "--handshakes", str(args.handshakes),
                              "--cert", cert[0], "--key", cert[1], *common], capture_output=True, text=True,
                             env=env, timeout=args.timeout)
        if out.returncode:
            raise SystemExit(f"{label}: handshakes failed: {out.stderr[-2000:]}")
        result.update(json.loads(out.stdout.strip().splitlines()[-1]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--systems", default="aioquic=aioquic,qh3=qh3",
                        help="comma-separated label=engine[@python] (default: both engines, this python)")
    parser.add_argument("--megabytes", type=int, default=256)
    parser.add_argument("--datagram-size", type=int, default=1452)
    parser.add_argument("--congestion", default="cubic", help="aioquic's controller (qh3 has its own)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="uvloop",
                        help="event loop of both sides (asyncio's datagram path costs ~13 µs more per datagram)")
    parser.add_argument("--wan", action="store_true", help="across bench/wan's packet-level path (root)")
    parser.add_argument("--rtt-ms", type=float, default=50.0)
    parser.add_argument("--rate-mbit", type=float, default=1000.0)
    parser.add_argument("--loss", type=float, default=0.0)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--handshakes", type=int, default=200,
                        help="in-memory handshakes per run for the CPU per handshake (0: none)")
    parser.add_argument("--json", help="write every run here")
    # Internal: one side of one run.
    parser.add_argument("--role", choices=("server", "client", "handshakes"), help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cert", help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    if args.role == "server":
        asyncio.run(_serve(args))
        return
    if args.role == "handshakes":
        print(json.dumps(_handshakes(args)))
        return
    if args.role == "client":
        print(json.dumps(asyncio.run(_client(args))))
        return

    systems = []
    for item in args.systems.split(","):
        label, _, spec = item.partition("=")
        engine, _, python = spec.partition("@")
        systems.append((label, engine, python or sys.executable))
    sys.path.insert(0, str(HERE.parent))
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in systems}
    with tempfile.TemporaryDirectory() as folder:
        cert = _certificate(folder)
        path = None
        if args.wan:
            from bench.wan.path import PathSpec, WanPath

            path = WanPath(PathSpec.symmetric(rtt_ms=args.rtt_ms, rate_mbit=args.rate_mbit, loss=args.loss))
            path.__enter__()
        try:
            print(f"# {'WAN ' + path.spec.describe() if path else 'loopback'}, {args.loop}; load average "
                  f"{os.getloadavg()[0]:.2f}; {args.megabytes} MiB one stream, datagrams {args.datagram_size} B",
                  flush=True)
            for rep in range(args.repeat):
                for system in systems:
                    run = _one_run(system, args, cert, path)
                    runs[system[0]].append(run)
                    print(f"{rep} {system[0]:14} {run['gbit_s']:.3f} Gbit/s  client {run['client_cpu_s_per_gb']:.1f}"
                          f" s/GB  server {run['server_cpu_s_per_gb']:.1f} s/GB ({run['server_us_per_datagram']:.1f}"
                          f" us/datagram)  64 B rtt p50 {run['rtt_p50_ms']:.2f} p99 {run['rtt_p99_ms']:.2f} ms"
                          f"  handshake {run.get('handshake_cpu_ms', float('nan')):.2f} ms CPU",
                          flush=True)
        finally:
            if path is not None:
                path.__exit__(None, None, None)
    print(f"# medians of {args.repeat}; load average at the end {os.getloadavg()[0]:.2f}")
    print("| system | Gbit/s | client CPU s/GB | server CPU s/GB | server µs/datagram | 64 B p50 ms | p99 ms |"
          " handshake CPU ms (both sides) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, results in runs.items():
        med = {key: statistics.median(r[key] for r in results) for key in results[0]}
        print(f"| {label} | {med['gbit_s']:.3f} | {med['client_cpu_s_per_gb']:.1f} | {med['server_cpu_s_per_gb']:.1f}"
              f" | {med['server_us_per_datagram']:.1f} | {med['rtt_p50_ms']:.2f} | {med['rtt_p99_ms']:.2f}"
              f" | {med.get('handshake_cpu_ms', float('nan')):.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
