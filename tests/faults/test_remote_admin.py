"""``--allow-remote-admin`` serves the admin API beyond loopback, over TLS only, with the
relay's own certificate; admin commands verify it with ``<state-dir>/ca.pem`` (or the CA file
they are given) and refuse a relay they cannot verify. Without the flag a non-loopback admin
address stops the relay at start with a clear message.

Found in a hostile review: the flag was never passed on, so the admin API could not be
served beyond loopback at all. About 5 s."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess

from relay.state import pki
from tests.faults.faultkit import FAST
from tests.helpers.processes import PY, ROOT, Relay, _env, free_port


def test_remote_admin_is_tls_only_and_verified(tmp_path):
    relay = Relay(tmp_path)
    admin_port = free_port()
    relay.serve_args = ["--admin-listen", f"0.0.0.0:{admin_port}", "--allow-remote-admin"]
    relay.start(**FAST)  # ready once `customers list` works: over https, verified with ca.pem
    try:
        url = json.loads((relay.state_dir / "admin.json").read_text())["url"]
        assert url == f"https://127.0.0.1:{admin_port}"
        customer = relay.create_customer("acme")
        assert customer.startswith("cus_")

        with socket.create_connection(("127.0.0.1", admin_port), timeout=10) as s:  # plain HTTP: no answer
            s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                answer = s.recv(100)
            except ConnectionResetError:
                answer = b""
        assert not answer.startswith(b"HTTP/"), answer

        context = ssl.create_default_context(cafile=relay.ca_file)
        with context.wrap_socket(socket.create_connection(("127.0.0.1", admin_port), timeout=10),
                                 server_hostname="127.0.0.1") as s:
            s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 200")

        other = pki.ensure_pki(tmp_path / "other-ca")  # a CA that did not issue the relay's certificate
        wrong = relay.cli("customers", "list", check=False, env={"RELAY_ADMIN_CA_FILE": other.ca_file})
        assert wrong.returncode == 1 and "failed TLS verification" in wrong.stderr, wrong.stderr
        assert relay.cli("--admin-ca-file", relay.ca_file, "customers", "list").returncode == 0
        assert "Traceback" not in relay.proc.log()
    finally:
        relay.stop()


def test_non_loopback_admin_needs_the_flag(tmp_path):
    out = subprocess.run([PY, "-m", "relay", "serve", "--state-dir", str(tmp_path / "state"),
                          "--listen", f"127.0.0.1:{free_port()}", "--admin-listen", f"0.0.0.0:{free_port()}"],
                         env=_env(), capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 1
    assert "non-loopback address '0.0.0.0' without --allow-remote-admin" in out.stderr, out.stderr
