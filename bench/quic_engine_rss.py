"""Idle memory of each QUIC engine's client side, through tunnel/quic_engine.py.

Each run is a fresh interpreter that reads its VmRSS after ``import tunnel.quic_engine`` (the
base), after ``load_engine(name)`` (the modules a client connection needs), and after one client
connection has built its first flight (configuration with a CA file, ``QuicConnection``,
``connect``, ``datagrams_to_send``: TLS and certificate code loaded). Runs are interleaved (A B A
B ...) and medians printed, with the load average: on a shared machine a reading also moves by
the 256 KiB of one allocator arena at random, so repeat.

    python bench/quic_engine_rss.py [--engines aioquic,qh3] [--repeat 7] [--cafile FILE] [--preload ssl,asyncio]

``--preload`` imports modules before the base reading (what an agent has loaded anyway).

Without ``--cafile`` a fresh one-certificate CA (``openssl req``) is used, as for an agent
with ``RELAY_CA_FILE``; pass the system bundle to see an agent that trusts the system store.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024
out = {}
import importlib
for name in filter(None, sys.argv[3].split(",")):
    importlib.import_module(name)
import tunnel.quic_engine as qe
out["base"] = rss()
engine = qe.load_engine(sys.argv[1])
out["loaded"] = rss()
config = engine.QuicConfiguration(is_client=True, alpn_protocols=["tunnel/1"], server_name="relay.example",
                                  max_datagram_size=1452)
config.load_verify_locations(cafile=sys.argv[2])
conn = engine.QuicConnection(configuration=config)
conn.connect(("127.0.0.1", 443), now=1.0)
conn.datagrams_to_send(now=1.0)
out["connection"] = rss()
out["modules"] = len(sys.modules)
out["heavy"] = sorted(m for m in ("cryptography.x509", "OpenSSL", "certifi", "service_identity", "aioquic", "qh3")
                      if m in sys.modules)
print(json.dumps(out))
"""


def one_ca(directory: str) -> str:
    ca = os.path.join(directory, "ca.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-subj", "/CN=bench CA", "-days", "1", "-keyout", os.path.join(directory, "ca.key"), "-out", ca],
                   check=True, capture_output=True)
    return ca


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="aioquic,qh3")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--cafile")
    parser.add_argument("--preload", default="", help="modules imported before the base reading, comma-separated")
    args = parser.parse_args()
    engines = args.engines.split(",")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        cafile = args.cafile or one_ca(tmp)
        runs: dict[str, list[dict]] = {name: [] for name in engines}
        for _ in range(args.repeat):
            for name in engines:  # interleaved
                done = subprocess.run([sys.executable, "-c", CHILD, name, cafile, args.preload], env=env, cwd=ROOT,
                                      capture_output=True, text=True, check=True)
                runs[name].append(json.loads(done.stdout))
    print(f"python {sys.version.split()[0]}, {args.repeat} runs each, interleaved; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; CA file {'given' if args.cafile else 'one certificate'}; "
          f"preloaded: {args.preload or 'nothing'}")
    print("| engine | base (MiB) | engine loaded | + client connection | added by the engine | modules | loaded of note |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, results in runs.items():
        med = {key: statistics.median(r[key] for r in results) for key in ("base", "loaded", "connection", "modules")}
        print(f"| {name} | {med['base']:.1f} | {med['loaded']:.1f} | {med['connection']:.1f} | "
              f"{med['connection'] - med['base']:+.1f} | {med['modules']:.0f} | {', '.join(results[0]['heavy'])} |")


if __name__ == "__main__":
    main()
