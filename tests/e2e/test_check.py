"""``tunnel-agent check`` against a real relay, a real CONNECT proxy (tinyproxy) and real
private services: a healthy set-up passes (and the check-only registration leaves a serving
agent and the relay's state untouched); each natural mistake fails on the right line with
the right fix: wrong or missing CA file, an expired certificate or one for another name, the
relay down, UDP blocked under quic:// (a warning under auto://), an expired JWT, a JWT of
another relay, a malformed one, an APP_HOST that does not resolve, an APP_PORT where nothing
listens, a proxy that refuses CONNECT or is not there. About 12 s."""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.processes import PY, ROOT, Relay, _env, connect, free_port, recv_all, wait_until

TINYPROXY = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"


def run_check(relay_url: str, token: str, *, ca_file: str | None, app_port: int, app_host: str = "127.0.0.1",
              name: str = "db", timeout: float = 3, **env) -> tuple[int, dict]:
    environ = _env(RELAY_URL=relay_url, REGISTRATION_JWT=token, NAME=name, APP_HOST=app_host, APP_PORT=app_port,
                   RELAY_CA_FILE=ca_file, **env)
    for k in ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"):
        if k not in env:
            environ.pop(k, None)
    out = subprocess.run([PY, "-m", "agent", "check", "--output", "json", "--timeout", str(timeout)], env=environ,
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert token not in out.stdout + out.stderr, "the check printed the token"
    return out.returncode, json.loads(out.stdout)


def by_name(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


def failed(report: dict) -> set[str]:
    return {c["name"] for c in report["checks"] if c["status"] == "fail"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """One relay, a customer, a JWT and a private service for the cheap cases."""
    from tests.helpers.processes import PrivateService

    relay = Relay(tmp_path_factory.mktemp("check")).start()
    service = PrivateService("echo")
    customer = relay.create_customer("acme")
    token = relay.jwt("--customer-id", customer)
    yield relay, customer, token, service
    service.close()
    relay.stop()


def test_healthy_setup_passes_and_leaves_serving_agents_alone(setup, agents):
    relay, customer, token, service = setup
    agents.start(f"wss://127.0.0.1:{relay.port}", token, "db", service.port, ca_file=relay.ca_file)
    relay.wait_available(customer, "db")
    before = relay.resource(customer, "db")

    for scheme in ("auto", "wss", "quic"):
        code, report = run_check(f"{scheme}://127.0.0.1:{relay.port}", token, ca_file=relay.ca_file,
                                 app_port=service.port)
        checks = by_name(report)
        assert code == 0 and report["ok"], report
        expected = {"config", "runtime", "relay-dns", "proxy", "relay-tcp", "relay-tls", "jwt", "jwt-accepted", "target db"}
        assert {n for n, c in checks.items() if c["status"] == "pass"} >= expected, report
        assert checks["relay-quic"]["status"] == ("skip" if scheme == "wss" else "pass"), report
        assert before["id"] in checks["jwt-accepted"]["detail"]
        # auto:// registers over the carrier it rides (WSS), and nothing calls QUIC faster
        # without having measured it.
        assert ("over quic" if scheme == "quic" else "over wss") in checks["jwt-accepted"]["detail"]
        assert "faster" not in json.dumps(report)

    # The check-only registrations joined nothing and created nothing; the agent still serves.
    after = relay.resource(customer, "db")
    assert after["agents"] == 1 and after["agents_detail"][0]["agent_id"] == before["agents_detail"][0]["agent_id"]
    with connect(relay.endpoint(customer, "db")) as s:
        s.sendall(b"still served")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"still served"
    code, report = run_check(f"wss://127.0.0.1:{relay.port}", token, ca_file=relay.ca_file, app_port=service.port,
                             name="not-yet")
    assert code == 0 and "created at the first registration" in by_name(report)["jwt-accepted"]["detail"]
    assert relay.resource(customer, "not-yet") is None
    assert "agent check from" in relay.proc.log()


def test_text_output_one_line_per_check(setup):
    relay, _, token, service = setup
    environ = _env(RELAY_URL=f"wss://127.0.0.1:{relay.port}", REGISTRATION_JWT=token, NAME="db", APP_HOST="127.0.0.1",
                   APP_PORT=1, RELAY_CA_FILE=relay.ca_file)
    out = subprocess.run([PY, "-m", "agent", "check"], env=environ, capture_output=True, text=True, timeout=60,
                         cwd=ROOT)
    assert out.returncode == 1
    lines = out.stdout.splitlines()
    assert len(lines) == 10 and all(line.split()[0] in ("PASS", "WARN", "FAIL", "SKIP") for line in lines), out.stdout
    [target] = [line for line in lines if line.startswith("FAIL")]
    assert "target db" in target and "nothing listens on 127.0.0.1:1" in target and "fix: start the service" in target


def test_wrong_or_missing_ca_file(setup, tmp_path):
    relay, _, token, service = setup
    other = Relay(tmp_path)  # another relay's CA: a natural mix-up
    from relay.state import pki

    pki.ensure_pki(other.state_dir, extra_names=["127.0.0.1"])
    for ca_file, words in ((other.ca_file, "RELAY_CA_FILE is the wrong file"), (None, "RELAY_CA_FILE is not set")):
        code, report = run_check(f"wss://127.0.0.1:{relay.port}", token, ca_file=ca_file, app_port=service.port)
        tls = by_name(report)["relay-tls"]
        assert code == 1 and failed(report) == {"relay-tls"}, report
        assert "not trusted" in tls["detail"] and words in tls["fix"] and "<state-dir>/ca.pem" in tls["fix"]
        assert by_name(report)["jwt-accepted"]["status"] == "skip"


def test_expired_jwt_and_jwt_from_another_relay(setup, tmp_path):
    relay, customer, token, service = setup
    from relay.control.tokens import TokenAuthority

    expired, _ = TokenAuthority(relay.state_dir).issue_with_claims(customer, ttl_seconds=60, now=time.time() - 3600)
    code, report = run_check(f"wss://127.0.0.1:{relay.port}", expired, ca_file=relay.ca_file, app_port=service.port)
    checks = by_name(report)
    assert code == 1 and failed(report) == {"jwt", "jwt-accepted"}, report
    assert "expired" in checks["jwt"]["detail"] and "registration-jwt --customer-id " + customer in checks["jwt"]["fix"]
    assert "expired" in checks["jwt-accepted"]["detail"]

    foreign = TokenAuthority(tmp_path / "other-relay").issue(customer)
    code, report = run_check(f"wss://127.0.0.1:{relay.port}", foreign, ca_file=relay.ca_file, app_port=service.port)
    accepted = by_name(report)["jwt-accepted"]
    assert code == 1 and failed(report) == {"jwt-accepted"}, report
    assert "signature invalid" in accepted["detail"] and "another relay" in accepted["fix"]

    code, report = run_check(f"wss://127.0.0.1:{relay.port}", "not-a-jwt", ca_file=relay.ca_file, app_port=service.port)
    assert failed(report) == {"jwt"} and by_name(report)["jwt-accepted"]["status"] == "skip", report


def test_targets_that_do_not_resolve_or_do_not_listen(setup):
    relay, _, token, _ = setup
    code, report = run_check(f"wss://127.0.0.1:{relay.port}", token, ca_file=relay.ca_file, app_port=5432,
                             app_host="db.invalid")
    target = by_name(report)["target db"]
    assert code == 1 and failed(report) == {"target db"}, report
    assert "db.invalid does not resolve" in target["detail"] and "fix APP_HOST" in target["fix"]

    code, report = run_check(f"wss://127.0.0.1:{relay.port}", token, ca_file=relay.ca_file, app_port=free_port())
    target = by_name(report)["target db"]
    assert code == 1 and failed(report) == {"target db"}, report
    assert "nothing listens" in target["detail"] and "APP_PORT" in target["fix"]


def test_configuration_mistakes(setup):
    relay, _, token, service = setup
    code, report = run_check(f"https://127.0.0.1:{relay.port}", token, ca_file=relay.ca_file, app_port=service.port)
    assert code == 1 and failed(report) == {"config"} and "RELAY_URL" in by_name(report)["config"]["detail"]
    assert {c["status"] for c in report["checks"][1:]} == {"skip"}


def test_relay_down(tmp_path, service_factory):
    relay = Relay(tmp_path).start()
    customer = relay.create_customer("acme")
    token = relay.jwt("--customer-id", customer)
    relay.stop()
    service = service_factory("echo")
    code, report = run_check(f"wss://127.0.0.1:{relay.port}", token, ca_file=relay.ca_file, app_port=service.port)
    tcp = by_name(report)["relay-tcp"]
    assert code == 1 and failed(report) == {"relay-tcp"}, report
    assert "connection refused" in tcp["detail"].lower() and "start the relay" in tcp["fix"]


# --- a real CONNECT proxy ---------------------------------------------------------------


class Tinyproxy:
    """tinyproxy in the foreground on a free loopback port, allowing CONNECT to ``ports`` only."""

    def __init__(self, workdir: Path, ports: list[int]) -> None:
        self.port = free_port()
        conf = workdir / f"tinyproxy-{self.port}.conf"
        conf.write_text(f"Port {self.port}\nListen 127.0.0.1\nTimeout 30\nMaxClients 20\nAllow 127.0.0.1\n"
                        + "".join(f"ConnectPort {p}\n" for p in ports) + "LogLevel Info\n")
        self.log = workdir / f"tinyproxy-{self.port}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([TINYPROXY, "-d", "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)

        def listening() -> bool:
            assert self.proc.poll() is None, self.log.read_text(errors="replace")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0
        wait_until(listening, 15, "tinyproxy to listen")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.mark.skipif(not os.access(TINYPROXY, os.X_OK), reason="tinyproxy is not installed (scripts/setup.sh)")
def test_through_a_proxy_that_allows_or_refuses_connect(setup, tmp_path):
    relay, _, token, service = setup
    url = f"wss://127.0.0.1:{relay.port}"
    allowing, refusing = Tinyproxy(tmp_path, [relay.port]), Tinyproxy(tmp_path, [443])
    try:
        code, report = run_check(url, token, ca_file=relay.ca_file, app_port=service.port,
                                 HTTPS_PROXY=f"http://127.0.0.1:{allowing.port}")
        checks = by_name(report)
        assert code == 0 and checks["proxy"]["status"] == "pass", report
        assert "through the proxy" in checks["relay-tcp"]["detail"] and checks["jwt-accepted"]["status"] == "pass"

        code, report = run_check(url, token, ca_file=relay.ca_file, app_port=service.port,
                                 HTTPS_PROXY=f"http://127.0.0.1:{refusing.port}")
        proxy = by_name(report)["proxy"]
        assert code == 1 and failed(report) == {"proxy"}, report
        assert "403" in proxy["detail"] and "allow CONNECT to 127.0.0.1:" in proxy["fix"] and "NO_PROXY" in proxy["fix"]

        # NO_PROXY exempts the relay: the refusing proxy is not in the way.
        code, report = run_check(url, token, ca_file=relay.ca_file, app_port=service.port,
                                 HTTPS_PROXY=f"http://127.0.0.1:{refusing.port}", NO_PROXY="127.0.0.1")
        assert code == 0 and "NO_PROXY" in by_name(report)["proxy"]["detail"], report

        code, report = run_check(url, token, ca_file=relay.ca_file, app_port=service.port,
                                 HTTPS_PROXY=f"http://127.0.0.1:{free_port()}")
        assert failed(report) == {"proxy"} and "unreachable" in by_name(report)["proxy"]["detail"], report
    finally:
        allowing.stop()
        refusing.stop()


# --- QUIC blocked -------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("iptables"), reason="needs root and iptables")
def test_udp_blocked_fails_quic_and_warns_auto(setup):
    relay, _, token, service = setup
    rule = ["INPUT", "-i", "lo", "-p", "udp", "--dport", str(relay.port), "-j", "DROP"]
    subprocess.run(["iptables", "-w", "5", "-I", *rule], check=True, timeout=30)
    try:
        code, report = run_check(f"quic://127.0.0.1:{relay.port}", token, ca_file=relay.ca_file,
                                 app_port=service.port, timeout=2)
        quic = by_name(report)["relay-quic"]
        assert code == 1 and failed(report) == {"relay-quic"}, report
        assert "blocked" in quic["detail"] and "allow outbound UDP" in quic["fix"] and "auto://" in quic["fix"]

        code, report = run_check(f"auto://127.0.0.1:{relay.port}", token, ca_file=relay.ca_file,
                                 app_port=service.port, timeout=2)
        checks = by_name(report)
        assert code == 0 and checks["relay-quic"]["status"] == "warn", report
        assert "over wss" in checks["jwt-accepted"]["detail"]
        assert "faster" not in checks["relay-quic"]["fix"] and "fall back to QUIC" in checks["relay-quic"]["fix"]
    finally:
        subprocess.run(["iptables", "-w", "5", "-D", *rule], check=True, timeout=30)


# --- certificates that are trusted but wrong ---------------------------------------------


def _certificates(directory: Path) -> dict[str, str]:
    """A CA, and two server certificates it signed: one expired (for 127.0.0.1), one current
    but for another name. Returns file paths."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("test CA")).issuer_name(name("test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(days=30)).not_valid_after(now + dt.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    files = {"ca": str(directory / "ca.pem")}
    Path(files["ca"]).write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for kind, san, start, end in (("expired", x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                   now - dt.timedelta(days=20), now - dt.timedelta(days=1)),
                                  ("other-name", x509.DNSName("relay.other.example"),
                                   now - dt.timedelta(days=1), now + dt.timedelta(days=20))):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(kind)).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(end)
                .add_extension(x509.SubjectAlternativeName([san]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        files[kind] = str(directory / f"{kind}.pem")
        files[kind + "-key"] = str(directory / f"{kind}.key")
        Path(files[kind]).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        Path(files[kind + "-key"]).write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                                 serialization.PrivateFormat.PKCS8,
                                                                 serialization.NoEncryption()))
    return files


@pytest.mark.parametrize("kind, words, fix", [
    ("expired", "certificate expired on", "renew"),
    ("other-name", "certificate is for relay.other.example, not 127.0.0.1", "--server-name"),
])
def test_certificate_expired_or_for_another_name(tmp_path, service_factory, kind, words, fix):
    files = _certificates(tmp_path)
    relay = Relay(tmp_path).start("--cert", files[kind], "--key", files[kind + "-key"])
    try:
        customer = relay.create_customer("acme")
        token = relay.jwt("--customer-id", customer)
        code, report = run_check(f"wss://127.0.0.1:{relay.port}", token, ca_file=files["ca"],
                                 app_port=service_factory("echo").port)
    finally:
        relay.stop()
    tls = by_name(report)["relay-tls"]
    assert code == 1 and failed(report) == {"relay-tls"}, report
    assert words in tls["detail"] and fix in tls["fix"], tls


def test_a_wrong_ca_is_told_apart_and_named_by_its_setting(setup, tmp_path):
    """Two relays' CAs never read as the same name; a CA of the same name (an older relay's, or
    one made by hand) is told apart by key id; ``ca_file`` from the config file is named so."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from relay.state import pki

    relay, _, token, service = setup
    other = Relay(tmp_path / "other")
    pki.ensure_pki(other.state_dir, extra_names=["127.0.0.1"])
    code, report = run_check(f"wss://127.0.0.1:{relay.port}", token, ca_file=other.ca_file, app_port=service.port)
    detail = by_name(report)["relay-tls"]["detail"]
    issuer, held = re.search(r"issued by '([^']+)'.* holds '([^']+)'", detail).groups()
    assert issuer != held, detail

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)])
    now = datetime.datetime.now(datetime.timezone.utc)
    twin = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    same = tmp_path / "same-name.pem"
    same.write_bytes(twin.public_bytes(serialization.Encoding.PEM))
    code, report = run_check(f"wss://127.0.0.1:{relay.port}", token, ca_file=str(same), app_port=service.port)
    detail = by_name(report)["relay-tls"]["detail"]
    assert "holds another CA of the same name (key id " in detail and detail.count("key id") == 2, detail
    ids = re.findall(r"key id ([0-9a-f:]+)", detail)
    assert len(ids) == 2 and ids[0] != ids[1], detail

    conf = tmp_path / "agent.toml"
    conf.write_text(f'ca_file = "{other.ca_file}"\n')
    code, report = run_check(f"wss://127.0.0.1:{relay.port}", token, ca_file=None, app_port=service.port,
                             AGENT_CONFIG_FILE=str(conf))
    tls, config = by_name(report)["relay-tls"], by_name(report)["config"]
    assert f"trust ca_file in {conf} {other.ca_file}" in config["detail"], config
    assert f"but ca_file in {conf} {other.ca_file} holds" in tls["detail"], tls
    assert f"ca_file in {conf} is the wrong file" in tls["fix"] and "RELAY_CA_FILE" not in tls["fix"], tls


@pytest.mark.skipif(importlib.util.find_spec("qh3") is None, reason="the optional QUIC engine qh3 is not installed")
def test_an_agent_on_qh3_checks_and_serves_over_quic(setup, agents):
    """TUNNEL_QUIC_ENGINE=qh3: the check names the engine and registers over QUIC on it; the
    agent serves through the (aioquic) relay."""
    relay, customer, token, service = setup
    code, report = run_check(f"quic://127.0.0.1:{relay.port}", token, ca_file=relay.ca_file, app_port=service.port,
                             name="qh3db", TUNNEL_QUIC_ENGINE="qh3")
    checks = by_name(report)
    assert code == 0 and report["ok"], report
    assert "QUIC engine qh3" in checks["runtime"]["detail"] and "over quic" in checks["jwt-accepted"]["detail"]
    agent = agents.start(f"quic://127.0.0.1:{relay.port}", token, "qh3db", service.port, ca_file=relay.ca_file,
                         TUNNEL_QUIC_ENGINE="qh3")
    relay.wait_available(customer, "qh3db")
    with connect(relay.endpoint(customer, "qh3db")) as s:
        s.sendall(b"over qh3" * 100_000)
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"over qh3" * 100_000
    assert agent.alive() and "Traceback" not in agent.log()
