"""Where the idle agent's memory goes, step by step, in one fresh interpreter: VmRSS after
each import and each run-time step the agent takes before it idles.

    python bench/idle_rss.py [--engine openssl|ssl]

Run it with the interpreter under test (a clean virtualenv: ``venv/bin/python
bench/idle_rss.py``; the sandbox's site-packages may import extra modules at start). The steps,
in the agent's order: the interpreter; ``ssl`` (OpenSSL loaded); ``asyncio``; uvloop; the TLS
engine (aiofastnet, with what its modules import); the agent's and tunnel's modules; the
standard-library modules the engine imports that nothing else of the agent does (listed);
one ``SSLContext`` with a CA file (what the agent builds per dial); the event loop's first
run; one TLS 1.3 connection through the engine to a local ``openssl s_server`` (certificate
made here by ``openssl req``) and a second one. Each line is one fresh reading, so the
columns add up; a reading moves by the 256 KiB of one obmalloc arena at random, so repeat.
"""

import os
import sys

# The measuring process (``--child``) imports nothing more than the interpreter has at start;
# the TLS server and the argument parsing live in the parent.


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Steps:
    def __init__(self) -> None:
        self.last = rss_mib()
        print("| step | VmRSS (MiB) | added (MiB) | modules |")
        print("|---|---:|---:|---:|")
        self.modules = len(sys.modules)
        print(f"| the interpreter | {self.last:.2f} | | {self.modules} |")

    def __call__(self, what: str) -> None:
        now = rss_mib()
        print(f"| {what} | {now:.2f} | {now - self.last:+.2f} | {len(sys.modules) - self.modules:+d} |", flush=True)
        self.last, self.modules = now, len(sys.modules)


def tls_server(tmp):
    """``openssl s_server`` (TLS 1.3 only) on a free loopback port with a fresh P-256 cert."""
    import socket
    import subprocess
    import time

    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost"], check=True, capture_output=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", str(cert),
                               "-key", str(key), "-tls1_3", "-quiet"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, port, cert
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("openssl s_server did not start") from None
            time.sleep(0.05)


def main() -> int:
    if sys.argv[1:2] == ["--child"]:
        run(int(sys.argv[2]), sys.argv[3], sys.argv[4])
        return 0
    import argparse
    import subprocess
    import tempfile
    from pathlib import Path

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=("openssl", "ssl"), default="openssl")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server, port, cert = tls_server(Path(tmp))
        try:
            # cwd: the directory of this file, so the interpreter's own packages (not a
            # checkout in the current directory) are measured
            return subprocess.run([sys.executable, os.path.abspath(__file__), "--child", str(port), str(cert),
                                   args.engine], env={**os.environ, "TUNNEL_TLS_ENGINE": args.engine},
                                  cwd=os.path.dirname(os.path.abspath(__file__))).returncode
        finally:
            server.kill()
            server.wait()


def run(port: int, cert: str, engine: str) -> None:
    step = Steps()
    import ssl  # noqa: F401 - each import is a step
    step("`ssl` (OpenSSL loaded)")
    import asyncio
    step("`asyncio`")
    import uvloop
    step("uvloop")
    before = set(sys.modules)
    if engine == "openssl":
        import aiofastnet  # noqa: F401
        step("the TLS engine: aiofastnet and what it imports")
    engine_modules = set(sys.modules) - before
    import agent.links  # noqa: F401
    import agent.runner  # noqa: F401
    import tunnel.carriers.wss  # noqa: F401
    import tunnel.ops.process  # noqa: F401
    step("the agent's and tunnel's modules")
    stdlib = sorted(m for m in engine_modules if not m.startswith(("aiofastnet", "_")) and "." not in m)
    if stdlib:
        print(f"\nstandard-library modules the engine imported: {', '.join(stdlib)} (run with `--engine ssl` "
              f"to see which of them the agent's own modules import anyway)\n")
    context = ssl.create_default_context(cafile=cert)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    step("one `SSLContext` with a CA file")
    from tunnel.carriers import tls

    async def connect() -> None:
        loop = asyncio.get_running_loop()
        step("the event loop, first run")
        transports = []
        for n in ("first", "second"):
            transport, _ = await tls.create_connection(loop, asyncio.Protocol, "127.0.0.1", port, ssl=context,
                                                       server_hostname="localhost")
            transports.append(transport)
            step(f"{n} TLS 1.3 connection ({tls.engine()} engine)")
        for transport in transports:
            transport.close()

    uvloop.run(connect())


if __name__ == "__main__":
    sys.exit(main())
