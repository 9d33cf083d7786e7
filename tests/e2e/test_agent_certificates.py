"""Enrolment end to end, real relay and agent processes over real TLS (docs/PROTOCOL.md,
"Enrolment"): an agent with a state directory enrols after its first registration by JWT,
keeps its key (0600) and certificate there, and from then on links by its certificate
without the JWT, on WSS (both TLS engines) and on QUIC, across a relay restart, and to every
relay of a cluster on PostgreSQL; it renews its certificate over the live link before two
thirds of its lifetime."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess

import pytest
from cryptography import x509

from tests.helpers.cluster import AGENT_ENV, aliases_work, cluster  # noqa: F401 - a fixture
from tests.helpers.processes import PY, ROOT, Relay, _env, connect, echoed, wait_until

FAST = {"TUNNEL_KEEPALIVE_INTERVAL": "1", "TUNNEL_KEEPALIVE_TIMEOUT": "3"}


def _serial(path) -> int:
    return x509.load_pem_x509_certificates(path.read_bytes())[0].serial_number


def _serves(relay, customer, name) -> bool:
    with connect(relay.endpoint(customer, name)) as s:
        return echoed(s, b"through the tunnel")


@pytest.mark.parametrize("carrier,engine", [("wss", "openssl"), ("wss", "ssl"), ("quic", "openssl")])
def test_enrolled_agent_links_by_certificate_without_its_jwt_across_a_relay_restart(
        relay, agents, service_factory, tmp_path, carrier, engine):
    relay.stop()
    relay.start(TUNNEL_TLS_ENGINE=engine)
    service = service_factory("echo")
    customer = relay.create_customer("acme")
    token = relay.jwt("--customer-id", customer)
    state = tmp_path / "agent-state"
    url = f"{carrier}://127.0.0.1:{relay.port}"
    env = dict(AGENT_STATE_DIR=str(state), TUNNEL_TLS_ENGINE=engine, **FAST)

    first = agents.start(url, token, "db", service.port, ca_file=relay.ca_file, **env)
    wait_until(lambda: "enrolled as" in first.log(), 30, "the agent to enrol")
    line = re.search(r"enrolled as (\w+), certificate expires (\S+)", first.log())
    instance = line.group(1)
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(state / "agent-key.pem").st_mode) == 0o600
    cert = x509.load_pem_x509_certificates((state / "agent-cert.pem").read_bytes())[0]
    uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier)
    assert uris == [f"tunnel:customer/{customer}", f"tunnel:instance/{instance}", "tunnel:scope/customer"]
    assert not [p for p in state.iterdir() if p.name.endswith(".tmp")]
    first.stop()
    if carrier == "wss" and engine == "openssl":
        # tunnel-agent check without a JWT: the certificate instead of the token.
        out = subprocess.run([PY, "-m", "agent", "check", "--output", "json", "--timeout", "3"], cwd=ROOT,
                             env=_env(RELAY_URL=url, NAME="db", APP_HOST="127.0.0.1", APP_PORT=service.port,
                                      RELAY_CA_FILE=relay.ca_file, AGENT_STATE_DIR=str(state)),
                             capture_output=True, text=True, timeout=120)
        checks = {c["name"]: c for c in json.loads(out.stdout)["checks"]}
        assert out.returncode == 0, out.stdout
        assert checks["certificate"]["status"] == "pass" and instance in checks["certificate"]["detail"]
        assert checks["jwt"]["status"] == checks["jwt-accepted"]["status"] == "skip"

    # The relay restarts; the agent comes back without any JWT, by its certificate alone.
    relay.stop()
    relay.start(TUNNEL_TLS_ENGINE=engine)
    second = agents.start(url, "", "db", service.port, ca_file=relay.ca_file, **env)
    relay.wait_available(customer, "db")
    assert _serves(relay, customer, "db")
    registered = [ln for ln in relay.proc.log().splitlines() if "registered: customer" in ln]
    assert registered and f"customer {customer}" in registered[-1] and f"{carrier} from" in registered[-1]
    assert f"instance {instance}, by certificate {cert.serial_number:x}" in registered[-1]
    assert "Traceback" not in second.log() + relay.proc.log()
    assert "REGISTRATION_JWT" not in second.log()
    if carrier == "wss":
        # The key is used by a helper process: the agent itself never loads cryptography (10 MB).
        with open(f"/proc/{second.pid}/maps") as maps:
            assert "cryptography" not in maps.read()


def test_certificate_renewed_over_the_live_link_then_used_by_new_links(relay, agents, service_factory, tmp_path):
    relay.stop()
    relay.start(RELAY_AGENT_CERT_TTL="60")
    service = service_factory("echo")
    customer = relay.create_customer("acme")
    token = relay.jwt("--customer-id", customer)
    state = tmp_path / "agent-state"
    env = dict(AGENT_STATE_DIR=str(state), **FAST)
    agent = agents.start(f"wss://127.0.0.1:{relay.port}", token, "db", service.port, ca_file=relay.ca_file, **env)
    wait_until(lambda: "enrolled as" in agent.log(), 30, "the agent to enrol")
    enrolled = _serial(state / "agent-cert.pem")
    relay.wait_available(customer, "db")
    agent_id = relay.resource(customer, "db")["agents_detail"][0]["agent_id"]
    # 60 % of a 60 s lifetime: renewed about 36 s after enrolment, over the same link.
    wait_until(lambda: "renewed the certificate" in agent.log(), 60, "the agent to renew its certificate")
    renewed = _serial(state / "agent-cert.pem")
    assert renewed != enrolled
    assert relay.resource(customer, "db")["agents_detail"][0]["agent_id"] == agent_id
    assert _serves(relay, customer, "db")
    agent.stop()

    # A new link presents the renewed certificate (no JWT to fall back on).
    again = agents.start(f"wss://127.0.0.1:{relay.port}", "", "db", service.port, ca_file=relay.ca_file, **env)
    relay.wait_available(customer, "db")
    assert _serves(relay, customer, "db")
    wait_until(lambda: f"by certificate {renewed:x}" in relay.proc.log(), 10, "the link by the renewed certificate")
    assert "Traceback" not in again.log() + relay.proc.log()


def test_state_directory_with_loose_permissions_is_refused(relay, agents, service_factory, tmp_path):
    service = service_factory("echo")
    customer = relay.create_customer("acme")
    token = relay.jwt("--customer-id", customer)
    state = tmp_path / "agent-state"
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)
    agent = agents.start(f"wss://127.0.0.1:{relay.port}", token, "db", service.port, ca_file=relay.ca_file,
                         AGENT_STATE_DIR=str(state))
    wait_until(lambda: not agent.alive(), 20, "the agent to exit")
    assert agent.proc.returncode == 2
    assert f"chmod 700 {state}" in agent.log()
    assert not (state / "agent-key.pem").exists()


@pytest.mark.skipif(not aliases_work(), reason="127.0.0.2/.3 are not loopback addresses here")
def test_enrolled_agent_links_by_certificate_to_every_relay_of_a_cluster(cluster, agents, service_factory,
                                                                         tmp_path):
    c = cluster()
    r1, r2, r3 = c.relays
    customer = r1.create_customer("acme")
    token = r1.jwt("--customer-id", customer)
    service = service_factory("echo")
    env = dict(AGENT_STATE_DIR=str(tmp_path / "agent-state"), **AGENT_ENV, **FAST)
    first = agents.start(c.urls(1, 2), token, "db", service.port, ca_file=c.ca_file, **env)
    wait_until(lambda: "enrolled as" in first.log(), 30, "the agent to enrol")
    serial = _serial(tmp_path / "agent-state" / "agent-cert.pem")
    first.stop()

    # No JWT: both links (the second and third relays) by the certificate the first issued,
    # and a worker on the first relay reaches the service through either.
    agents.start(c.urls(1, 2), "", "db", service.port, ca_file=c.ca_file, **env)
    for relay in (r2, r3):
        wait_until(lambda: f"by certificate {serial:x}" in relay.proc.log(), 30, f"a link by certificate to {relay.host}")
    r1.wait_available(customer, "db")
    assert _serves(r1, customer, "db")
    assert "Traceback" not in "".join(r.proc.log() for r in c.relays)


def test_a_relay_with_another_ca_refuses_the_certificate_and_the_agent_says_what_to_do(
        relay, agents, service_factory, tmp_path):
    service = service_factory("echo")
    customer = relay.create_customer("acme")
    state = tmp_path / "agent-state"
    env = dict(AGENT_STATE_DIR=str(state), **FAST)
    first = agents.start(relay.url, relay.jwt("--customer-id", customer), "db", service.port, ca_file=relay.ca_file,
                         **env)
    wait_until(lambda: "enrolled as" in first.log(), 30, "the agent to enrol")
    first.stop()
    relay.stop()

    # Another relay (its own CA) on the same address: its TLS layer refuses the certificate.
    other = Relay(tmp_path / "other", port=relay.port)
    (tmp_path / "other").mkdir()
    other.start()
    try:
        agent = agents.start(other.url, "", "db", service.port, ca_file=other.ca_file, **env)
        wait_until(lambda: "remove that file and enrol again" in agent.log(), 30, "the agent's hint")
        assert agent.alive()  # it keeps trying: the operator may restore the relay's CA
        assert "registered: customer" not in other.proc.log()
    finally:
        other.stop()
