"""The agent's identity files (agent.identity): the state directory's modes and lock, the key
made once (by the helper process, as every use of the key), the certificate checked against the key and swapped atomically, and the renewal
schedule on passed-in time (renewed at 60 % of the lifetime left when it was written, never
presented within EXPIRY_MARGIN of its end)."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.config import ConfigError, load
from agent.identity import EXPIRY_MARGIN, AgentIdentity, IdentityError, default_state_dir
from relay.state.enrolment import issue_agent_certificate

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)


def _store(identity: AgentIdentity, certificate: str, now: float) -> None:
    asyncio.run(identity.store(certificate, now))


@pytest.fixture
def ca():
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(NOW - dt.timedelta(days=1)).not_valid_after(NOW + dt.timedelta(days=9))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(key, hashes.SHA256()))
    return cert, key


def _issue(identity: AgentIdentity, ca, ttl: int = 3600, instance: str = "abc123") -> str:
    issued = issue_agent_certificate(asyncio.run(identity.csr(instance)), ca_cert=ca[0], ca_key=ca[1], customer_id="cus_x",
                                     resource_ids=None, instance=instance, ttl=ttl, now=NOW)
    return issued.certificate.decode()


def test_key_made_once_with_private_modes_and_certificate_stored_atomically(tmp_path, ca):
    state = tmp_path / "state"
    identity = AgentIdentity.open(state)
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(state / "agent-key.pem").st_mode) == 0o600
    assert not identity.enrolled and identity.renew_at() is None and not identity.usable(NOW.timestamp())
    key = (state / "agent-key.pem").read_bytes()
    written = NOW.timestamp()
    _store(identity, _issue(identity, ca), written)
    assert identity.instance == "abc123" and identity.customer_id == "cus_x" and identity.resource_ids is None
    assert [p.name for p in state.iterdir() if p.name.endswith(".tmp")] == []
    identity.close()

    again = AgentIdentity.open(state)  # a restart: same key, the certificate read back
    assert (state / "agent-key.pem").read_bytes() == key
    assert again.instance == "abc123" and again.serial == identity.serial
    assert again.renew_at() == pytest.approx(written + 0.6 * 3600)
    again.close()


def test_renewal_schedule_on_passed_in_time(tmp_path, ca):
    identity = AgentIdentity.open(tmp_path / "state")
    start = NOW.timestamp()
    _store(identity, _issue(identity, ca, ttl=600), start)
    assert identity.renew_at() == pytest.approx(start + 360)  # before two thirds of 600 s
    assert identity.usable(start + 599 - EXPIRY_MARGIN)
    assert not identity.usable(start + 600 - EXPIRY_MARGIN)  # not presented that close to its end
    renewed_at = start + 361
    _store(identity, _issue(identity, ca, ttl=600), renewed_at)  # the relay's clock still says NOW
    assert identity.renew_at() == pytest.approx(renewed_at + 0.6 * (start + 600 - renewed_at))
    identity.close()


def test_a_certificate_for_another_key_is_refused_and_the_old_one_kept(tmp_path, ca):
    one = AgentIdentity.open(tmp_path / "one")
    other = AgentIdentity.open(tmp_path / "other")
    _store(one, _issue(one, ca), NOW.timestamp())
    before = (tmp_path / "one" / "agent-cert.pem").read_bytes()
    with pytest.raises(IdentityError, match="not for the key"):
        _store(one, _issue(other, ca, instance="zzz"), NOW.timestamp())
    assert (tmp_path / "one" / "agent-cert.pem").read_bytes() == before and one.instance == "abc123"
    one.close()
    other.close()


def test_loose_modes_and_unusable_directories_are_clear_errors(tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir()
    os.chmod(loose, 0o755)
    with pytest.raises(IdentityError, match=f"chmod 700 {loose}"):
        AgentIdentity.open(loose)
    state = tmp_path / "state"
    AgentIdentity.open(state).close()
    os.chmod(state / "agent-key.pem", 0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        AgentIdentity.open(state)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(IdentityError, match="cannot create the agent state directory"):
        AgentIdentity.open(blocker / "state")


def test_one_process_per_state_directory(tmp_path):
    first = AgentIdentity.open(tmp_path / "state")
    assert AgentIdentity.open(tmp_path / "state") is None  # locked (another agent process)
    first.close()
    AgentIdentity.open(tmp_path / "state").close()


def test_state_dir_defaults_and_a_jwt_is_optional_once_enrolled(tmp_path, ca):
    assert default_state_dir("/etc/tunnel-agent/agent.toml", {}) == "/etc/tunnel-agent/agent.state"
    assert default_state_dir(None, {}) is None
    assert default_state_dir("/x/a.toml", {"AGENT_STATE_DIR": "/var/lib/a"}) == "/var/lib/a"
    env = {"RELAY_URL": "wss://relay.example.com:8443", "NAME": "db", "APP_HOST": "127.0.0.1", "APP_PORT": "5432",
           "AGENT_STATE_DIR": str(tmp_path / "state")}
    with pytest.raises(ConfigError, match="REGISTRATION_JWT"):
        load(env)
    identity = AgentIdentity.open(tmp_path / "state")
    _store(identity, _issue(identity, ca), NOW.timestamp())
    identity.close()
    conf = load(env)
    assert conf.token == "" and conf.state_dir == str(tmp_path / "state")


def test_csr_names_the_instance_only(tmp_path):
    identity = AgentIdentity.open(tmp_path / "state")
    csr = x509.load_pem_x509_csr(asyncio.run(identity.csr("inst-1")).encode())
    assert csr.is_signature_valid and csr.subject.rfc4514_string() == "CN=inst-1" and len(csr.extensions) == 0
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    assert csr.public_key().public_bytes(serialization.Encoding.DER, public) == \
        serialization.load_pem_private_key((tmp_path / "state" / "agent-key.pem").read_bytes(), None) \
        .public_key().public_bytes(serialization.Encoding.DER, public)
    identity.close()


def test_a_default_state_dir_that_cannot_be_made_means_the_jwt_alone(tmp_path, caplog):
    import dataclasses

    from agent.cli import _open_identity

    blocker = tmp_path / "file"
    blocker.write_text("")
    env = {"RELAY_URL": "wss://relay.example.com:8443", "NAME": "db", "APP_HOST": "127.0.0.1", "APP_PORT": "5432",
           "REGISTRATION_JWT": "a.b.c"}
    conf = dataclasses.replace(load(env), state_dir=str(blocker / "agent.state"))
    assert _open_identity(conf) is None  # the default beside the config file: a warning
    assert "linking with the registration JWT only" in caplog.text
    with pytest.raises(ValueError, match="cannot create the agent state directory"):
        _open_identity(dataclasses.replace(conf, state_dir_set=True))  # AGENT_STATE_DIR given: an error
    with pytest.raises(ValueError, match="cannot create"):
        _open_identity(dataclasses.replace(conf, token=""))  # nothing else to link with
