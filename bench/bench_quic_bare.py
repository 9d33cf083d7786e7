"""Bare aioquic, no tunnel: one stream of SIZE bytes from client to server over loopback.

The baseline for bench_quic.py: aioquic's own asyncio client/server (``aioquic.asyncio``
connect/serve, stream reader/writer), a self-signed certificate made here, the server in a
child process so each side has its own core. Prints MB/s.

    python bench/bench_quic_bare.py [--size-mb 200] [--uvloop] [--datagram-size 1452] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import multiprocessing
import os
import resource
import ssl
import sys
import tempfile
import time

from aioquic.asyncio import connect, serve
from aioquic.quic.configuration import QuicConfiguration
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ALPN = "bench"
CHUNK = 64 * 1024


def make_cert(directory: str) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


def new_loop(use_uvloop: bool):
    if use_uvloop:
        import uvloop
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def server_main(cert: str, key: str, port_queue, use_uvloop: bool, dgram: int = 1452) -> None:
    async def main():
        config = QuicConfiguration(is_client=False, alpn_protocols=[ALPN], max_datagram_size=dgram,
                                   max_data=64 * 1024 * 1024, max_stream_data=8 * 1024 * 1024)
        config.load_cert_chain(cert, key)

        def handler(reader, writer):
            async def run():
                total = 0
                while True:
                    data = await reader.read(1 << 20)
                    if not data:
                        break
                    total += len(data)
                writer.write(str(total).encode())
                writer.write_eof()
            asyncio.ensure_future(run())

        server = await serve("127.0.0.1", 0, configuration=config, stream_handler=handler)
        port_queue.put(server._transport.get_extra_info("sockname")[1])
        await asyncio.Event().wait()

    loop = new_loop(use_uvloop)
    loop.run_until_complete(main())


async def client(port: int, cert: str, size: int, dgram: int = 1452) -> float:
    config = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], max_datagram_size=dgram,
                               server_name="localhost", verify_mode=ssl.CERT_REQUIRED)
    config.load_verify_locations(cert)
    async with connect("127.0.0.1", port, configuration=config) as protocol:
        reader, writer = await protocol.create_stream()
        block = os.urandom(CHUNK)
        start = time.perf_counter()
        sent = 0
        while sent < size:
            writer.write(block)
            sent += len(block)
            if sent % (1 << 20) == 0:
                await writer.drain()
                await asyncio.sleep(0)  # aioquic's drain never blocks: let the loop send
        writer.write_eof()
        answer = await reader.read()
        elapsed = time.perf_counter() - start
        assert int(answer) == sent, (answer, sent)
        return elapsed


def run_once(size: int, use_uvloop: bool, dgram: int):
    """One transfer; returns (seconds, sender CPU-s, receiver CPU-s)."""
    with tempfile.TemporaryDirectory() as d:
        cert, key = make_cert(d)
        queue = multiprocessing.Queue()
        proc = multiprocessing.Process(target=server_main, args=(cert, key, queue, use_uvloop, dgram), daemon=True)
        child0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc.start()
        try:
            port = queue.get(timeout=30)
            cpu0 = time.process_time()
            loop = new_loop(use_uvloop)
            elapsed = loop.run_until_complete(client(port, cert, size, dgram))
            loop.close()
        finally:
            cpu_client = time.process_time() - cpu0
            proc.terminate()
            proc.join()
    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    return elapsed, cpu_client, (child.ru_utime + child.ru_stime) - (child0.ru_utime + child0.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--uvloop", action="store_true")
    parser.add_argument("--datagram-size", type=int, default=1452,
                        help="aioquic's max_datagram_size on both ends (at most 16383: 2-byte frame lengths)")
    parser.add_argument("--repeat", type=int, default=1, help="runs; the best of each figure is reported too")
    args = parser.parse_args()
    size = args.size_mb * 1024 * 1024
    label = f"bare aioquic {'uvloop' if args.uvloop else 'asyncio'} datagram={args.datagram_size}"
    runs = []
    for _ in range(args.repeat):
        load = os.getloadavg()[0]
        elapsed, cpu_client, cpu_server = run_once(size, args.uvloop, args.datagram_size)
        mbps = size / elapsed / 1e6
        runs.append((mbps, size / 1e6 / cpu_client, size / 1e6 / cpu_server))
        print(f"{label}: {size / 1e6:.0f} MB in {elapsed:.2f} s = {mbps:.1f} MB/s ({mbps * 8 / 1000:.2f} Gbit/s); "
              f"load {load:.2f}")
        print(f"  CPU: sender {cpu_client:.2f} s ({runs[-1][1]:.1f} MB per CPU-s), "
              f"receiver {cpu_server:.2f} s ({runs[-1][2]:.1f} MB per CPU-s, includes its setup)", flush=True)
    if args.repeat > 1:
        best = [max(r[k] for r in runs) for k in range(3)]
        print(f"BEST {label}: {best[0]:.1f} MB/s wall ({best[0] * 8 / 1000:.2f} Gbit/s), "
              f"sender {best[1]:.1f} MB/CPU-s, receiver {best[2]:.1f} MB/CPU-s")


if __name__ == "__main__":
    sys.exit(main())
