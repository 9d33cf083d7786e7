"""The main job on one machine: a relay, a sample private service and an agent, on the
embedded defaults, with a request and a throughput run through the tunnel.

Run by scripts/demo.sh. ``--keep`` leaves everything running until Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVICE_PORT = 18080


# Run the installed code of this checkout whatever the current directory.
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def tool(name: str) -> list[str]:
    path = shutil.which(name)
    return [path] if path else [sys.executable, "-m", name.split("-", 1)[1]]


def relay_cmd(*args: str, state: Path) -> str:
    out = subprocess.run(tool("tunnel-relay") + ["--state-dir", str(state), *args],
                         capture_output=True, text=True, timeout=30, env=ENV)
    if out.returncode:
        raise SystemExit(f"tunnel-relay {' '.join(args[:2])} failed: {out.stderr.strip()}")
    return out.stdout.strip()


def wait_for(what: str, check, timeout: float = 30.0, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"{what}: the process exited with code {proc.returncode}")
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def http_get(host: str, port: int, path: str, progress: bool = False) -> tuple[bytes, int, float]:
    """GET over a plain socket; returns (head, body bytes, seconds)."""
    start = time.perf_counter()
    with socket.create_connection((host, port), timeout=30) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: demo\r\n\r\n".encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                raise SystemExit("connection closed before the response head")
            buf += chunk
        head, body = buf.split(b"\r\n\r\n", 1)
        length = int([h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")][0].split(b":")[1])
        got = len(body)
        view = bytearray(1 << 20)
        last = 0.0
        while got < length:
            n = s.recv_into(view)
            if not n:
                raise SystemExit(f"connection closed after {got} of {length} bytes")
            got += n
            now = time.perf_counter()
            if progress and (now - last > 0.2 or got == length):
                last = now
                done = got / length
                rate = got / (now - start) / 1e6
                bar = "#" * int(done * 40)
                print(f"\r  [{bar:<40}] {done:6.1%}  {got / 1e6:8.1f} MB  {rate:7.1f} MB/s", end="", flush=True)
        if progress:
            print()
    return head + b"\r\n\r\n" + (body if not progress else b""), got, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", action="store_true", help="keep relay, agent and service running")
    parser.add_argument("--state-dir", default=os.environ.get("RELAY_STATE_DIR", "relay-state"))
    parser.add_argument("--transport", default="wss", choices=("wss", "quic", "auto"))
    parser.add_argument("--megabytes", type=int, default=1024, help="size of the throughput run")
    parser.add_argument("--service-port", type=int, default=SERVICE_PORT, help="the sample service's port")
    parser.add_argument("--port", type=int, default=8443, help="the relay's agent port")
    parser.add_argument("--admin-port", type=int, default=8442, help="the relay's admin API port (loopback)")
    args = parser.parse_args()
    service_port, relay_port = args.service_port, args.port
    state = Path(args.state_dir).resolve()
    logs = state / "logs"
    procs: list[subprocess.Popen] = []

    def start(name: str, cmd: list[str], env: dict | None = None) -> subprocess.Popen:
        logs.mkdir(parents=True, exist_ok=True)
        log = open(logs / f"{name}.log", "ab")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env or ENV, start_new_session=True)
        procs.append(proc)
        return proc

    try:
        print(f"1. sample private service on 127.0.0.1:{service_port}")
        for port, option in ((service_port, "--service-port"), (relay_port, "--port"), (args.admin_port, "--admin-port")):
            if port_open(port):
                raise SystemExit(f"port {port} is busy: stop what listens there first, or give {option} PORT")
        service = start("service", [sys.executable, str(ROOT / "scripts" / "sample_service.py"), str(service_port)])
        wait_for("the sample service", lambda: port_open(service_port), proc=service)

        print(f"2. relay (state in {state}, agents on :{relay_port}, admin on 127.0.0.1:{args.admin_port})")
        relay = start("relay", tool("tunnel-relay") + ["serve", "--state-dir", str(state), "--listen",
                                                       f"0.0.0.0:{relay_port}", "--admin-listen",
                                                       f"127.0.0.1:{args.admin_port}"])
        wait_for("the relay's admin API", lambda: (state / "admin.json").exists() and port_open(relay_port),
                 proc=relay)

        customers = json.loads(relay_cmd("customers", "list", "--output", "json", state=state))
        customer = next((c["id"] for c in customers if c["name"] == "demo"), None) \
            or relay_cmd("customers", "create", "demo", state=state)
        jwt_file = state / "demo-agent.jwt"
        relay_cmd("resources", "registration-jwt", "--customer-id", customer, "--output", str(jwt_file), state=state)
        print(f"3. customer {customer}; registration JWT written to {jwt_file} (mode 0600)")

        env = dict(ENV, RELAY_URL=f"{args.transport}://127.0.0.1:{relay_port}", RELAY_CA_FILE=str(state / "ca.pem"),
                   NAME="demo-http", APP_HOST="127.0.0.1", APP_PORT=str(service_port),
                   REGISTRATION_JWT_FILE=str(jwt_file))
        agent = start("agent", tool("tunnel-agent"), env=env)
        print(f"4. agent dialling {env['RELAY_URL']}")

        def available():
            rows = json.loads(relay_cmd("resources", "list", "--output", "json", state=state))
            row = next((r for r in rows if r["customer_id"] == customer and r["name"] == "demo-http"), None)
            return row if row and row["status"] == "AVAILABLE" else None

        row = wait_for("the resource to become AVAILABLE", available, proc=agent)
        host, _, port = row["endpoint"].rpartition(":")
        print(f"5. resource {row['id']} AVAILABLE; integration endpoint {row['endpoint']}")

        head, _, secs = http_get(host, int(port), "/")
        print(f"6. GET / through the tunnel ({secs * 1000:.1f} ms):")
        print("   " + head.decode(errors="replace").replace("\r\n", "\n   ").strip())
        print(f"7. throughput: {args.megabytes} MB through the tunnel")
        _, got, secs = http_get(host, int(port), f"/bytes?n={args.megabytes * 1_000_000}", progress=True)
        print(f"   {got / 1e6:.0f} MB in {secs:.2f} s = {got / secs / 1e6:.0f} MB/s ({got * 8 / secs / 1e9:.2f} Gbit/s)")

        print(f"""
Each part by hand (logs of this run are in {logs}; the programs are in {Path(sys.prefix) / "bin"}:
`. {Path(sys.prefix) / "bin" / "activate"}` puts them on PATH):
  tunnel-relay serve --state-dir {state}
  tunnel-relay --state-dir {state} customers create acme
  tunnel-relay --state-dir {state} resources registration-jwt --customer-id <id> --output agent.jwt
  RELAY_URL=wss://127.0.0.1:8443 RELAY_CA_FILE={state}/ca.pem NAME=my-db \\
    APP_HOST=127.0.0.1 APP_PORT=5432 REGISTRATION_JWT_FILE=agent.jwt tunnel-agent
  tunnel-relay --state-dir {state} resources list --extended
  psql -h <endpoint host> -p <endpoint port> ...   # any TCP client, through the tunnel""")
        if args.keep:
            print("\nrunning; Ctrl-C stops relay, agent and service")
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
        return 0
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    sys.exit(main())
