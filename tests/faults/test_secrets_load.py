"""Secrets stay out of logs, errors and process listings; 1,000 concurrent exact streams
through one agent; a client that never reads does not slow another stream."""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.faults.faultkit import FAST, echo_once, raise_nofile, setup_agent, wait_until
from tests.helpers.processes import connect, recv_all


def test_secrets_never_in_logs_cmdlines_or_errors(agents, service_factory, tmp_path):
    from tests.helpers.processes import Relay

    relay = Relay(tmp_path)
    relay.start(LOG_LEVEL="DEBUG", **FAST)
    try:
        _secrets_session(relay, agents, service_factory, tmp_path)
    finally:
        relay.stop()


def _secrets_session(relay, agents, service_factory, tmp_path):
    service = service_factory("echo")
    customer, token, agent, addr = setup_agent(relay, agents, service, "wss")
    assert echo_once(addr, b"traffic") == b"traffic"
    # Refusals, with secrets of every kind in play: revoked, other customer's, garbage.
    rid = relay.resource(customer, "db")["id"]
    rotated = relay.jwt("--customer-id", customer, "--resource-id", rid, "--rotate")
    wait_until(lambda: not agent.alive(), 30, "the revoked agent to exit")
    other = relay.create_customer("other")
    other_token = relay.jwt("--customer-id", other)
    token_file = tmp_path / "jwt"
    token_file.write_text(rotated)
    token_file.chmod(0o600)
    refused = agents.start(f"quic://127.0.0.1:{relay.port}", token, "db", service.port, ca_file=relay.ca_file, **FAST)
    good = agents.start(f"wss://127.0.0.1:{relay.port}", "", "db", service.port, ca_file=relay.ca_file,
                        REGISTRATION_JWT_FILE=str(token_file), **FAST)
    agents.start(f"wss://127.0.0.1:{relay.port}", other_token + "x", "db", service.port, ca_file=relay.ca_file, **FAST)
    wait_until(lambda: not refused.alive(), 30, "the revoked agent to exit")
    relay.wait_available(customer, "db")
    assert echo_once(addr, b"again") == b"again"
    admin_token = (relay.state_dir / "admin-token").read_text().strip()
    secrets = {"jwt": token, "rotated jwt": rotated, "other jwt": other_token, "admin token": admin_token}
    # Signatures alone are secret too (a log line could cut a token short).
    secrets.update({f"{k} signature": v.rsplit(".", 1)[1] for k, v in list(secrets.items()) if v.count(".") == 2})
    texts = {p.name: p.read_text(errors="replace") for p in tmp_path.glob("*.log")}
    for name, text in texts.items():
        for what, secret in secrets.items():
            assert secret not in text, f"{what} in {name}"
    for proc in [relay.proc, good]:
        cmdline = open(f"/proc/{proc.pid}/cmdline", "rb").read()
        for what, secret in secrets.items():
            assert secret.encode() not in cmdline, f"{what} in the command line of {proc.name}"
    for name in ("admin-token", "signing-key.pem"):
        assert stat.S_IMODE((relay.state_dir / name).stat().st_mode) & 0o077 == 0, name
    # Exception messages from the token checks never quote the token.
    from relay.control.tokens import TokenAuthority
    from tunnel.wire.errors import AuthError

    authority = TokenAuthority(relay.state_dir)
    for bad in (token[:-3] + "abc", token + ".x", "Bearer " + token, token.replace(".", "!")):
        with pytest.raises(AuthError) as info:
            authority.verify(bad)
        assert token not in str(info.value) and bad not in str(info.value)


def _load(relay, agents, service_factory, transport: str, n: int = 1000) -> None:
    raise_nofile(20000)
    service = service_factory("echo")
    _, _, agent, addr = setup_agent(relay, agents, service, transport)
    socks = []
    try:
        for i in range(n):
            socks.append(connect(addr, timeout=60))
        payloads = [os.urandom(2048 + i) for i in range(n)]
        t0 = time.monotonic()

        def send(i):
            socks[i].sendall(payloads[i])
            socks[i].shutdown(socket.SHUT_WR)

        def check(i):
            return recv_all(socks[i]) == payloads[i]

        with ThreadPoolExecutor(64) as pool:
            list(pool.map(send, range(n)))
            results = list(pool.map(check, range(n)))
        print(f"load/{transport}: {n} concurrent streams, {results.count(True)} exact in "
              f"{time.monotonic() - t0:.1f}s; agent RSS {open(f'/proc/{agent.pid}/status').read().split('VmRSS:')[1].split()[0]} KiB")
        assert all(results), f"{results.count(False)} streams not exact"
    finally:
        for s in socks:
            s.close()


def test_thousand_concurrent_streams(relay, agents, service_factory, transport):
    _load(relay, agents, service_factory, transport)


class SizedService:
    """Reads an 8-byte size, sends that many bytes of a fixed pattern, then closes."""

    def __init__(self) -> None:
        self.blob = os.urandom(1024 * 1024)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn) -> None:
        with conn:
            try:
                size = int.from_bytes(conn.recv(8, socket.MSG_WAITALL), "big")
                for _ in range(size // len(self.blob)):
                    conn.sendall(self.blob)
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


def test_a_client_that_never_reads_does_not_slow_another(relay, agents, transport):
    service = SizedService()
    try:
        _, _, agent, addr = setup_agent(relay, agents, service, transport)
        size = 16 * 1024 * 1024

        def download() -> float:
            t = time.monotonic()
            with connect(addr) as s:
                s.sendall(size.to_bytes(8, "big"))
                got = recv_all(s)
            assert got == service.blob * (size // len(service.blob))
            return time.monotonic() - t

        alone = min(download() for _ in range(2))
        stalled = connect(addr)
        try:
            stalled.sendall((256 * 1024 * 1024).to_bytes(8, "big"))  # 256 MiB it never reads
            # Let the stalled stream fill its windows and buffers (same agent, same link).
            wait_until(lambda: relay.resource(relay.resources()[0]["customer_id"], "db")["agents_detail"][0]
                       ["bytes_received"] > 16 * 1024 * 1024, 30, "the stalled stream to fill its window")
            during = download()
        finally:
            stalled.close()
        print(f"stall/{transport}: 16 MiB alone {alone:.2f}s, beside a stalled 256 MiB download {during:.2f}s")
        assert during <= max(3 * alone, alone + 2.0)
    finally:
        service.close()
