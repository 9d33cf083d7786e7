"""Links that authenticate by an agent certificate, against hostile certificates
(docs/PROTOCOL.md, "Enrolment"): one from another CA and an expired one fail the TLS handshake
(OpenSSL verifies with the relay's CA as the only trust anchor); one naming a resource of
another customer, one asked to serve a resource outside its scope (at registration or added on
the live link), one that is not an agent
certificate (the relay's own relay-to-relay certificate), and a revoked one are refused with
a clear error and a closed link; on QUIC, where the certificate travels in ``auth``, one from
another CA and a wrong proof of its key are refused the same. The relay goes on serving."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import ssl

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from relay.control.server import AgentLinkHandler, Relay
from relay.control.tokens import TokenAuthority
from relay.data.registry import Registry
from relay.state.cluster import Cluster
from relay.state import pki
from relay.state.enrolment import PROOF_CONTEXT, issue_agent_certificate
from relay.state.relay_state import RelayState
from tests.faults.faultkit import Recorder, auth_message, until
from tests.faults.test_enrolment import csr as make_csr
from tests.faults.test_registration_race import RecordingLink
from tunnel.core.limits import Limits
from tunnel.wire.constants import ErrorCode
from tunnel.wire.errors import LinkError


def _ca(name: str = "another CA"):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def _relay_ca(relay):
    cert = x509.load_pem_x509_certificate((relay.state_dir / "ca.pem").read_bytes())
    key = serialization.load_pem_private_key((relay.state_dir / "ca-key.pem").read_bytes(), None)
    return cert, key


def _agent_cert(tmp_path, ca, *, customer: str, resources, instance: str = "inst-h", ttl: int = 3600,
                now: dt.datetime | None = None):
    """Files (cert chain, key) of an agent certificate ``ca`` issued, as the relay would."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
           .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode())
    issued = issue_agent_certificate(csr, ca_cert=ca[0], ca_key=ca[1], customer_id=customer,
                                     resource_ids=resources, instance=instance, ttl=ttl, now=now)
    cert_file, key_file = tmp_path / f"{instance}-{issued.serial:x}.pem", tmp_path / f"{instance}-key.pem"
    cert_file.write_bytes(issued.certificate)
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_file), str(key_file), key


async def _link_with(relay, cert_file: str, key_file: str, names, transport: str = "wss", certificate=None,
                     add: str | None = None, enroll: str | None = None):
    """Dial with the certificate (WSS: at the TLS layer; QUIC: in ``auth``), authenticate
    without a token; the recorder, or the exception the dial raised."""
    from tunnel.carriers.quic import connect_quic
    from tunnel.carriers.wss import connect_wss

    try:
        if transport == "quic":
            link = await connect_quic("127.0.0.1", relay.port, ca_file=relay.ca_file, server_name="127.0.0.1",
                                      limits=Limits(), timeout=10)
        else:
            context = ssl.create_default_context(cafile=relay.ca_file)
            context.load_cert_chain(cert_file, key_file)
            link = await connect_wss(f"wss://127.0.0.1:{relay.port}", ssl_context=context, limits=Limits(), timeout=10)
    except Exception as exc:  # noqa: BLE001 - what the test looks at
        return exc
    recorder = Recorder()
    link.set_handler(recorder)
    message = auth_message("", names, instance="ignored")
    del message["token"]
    if certificate is not None:
        message["certificate"] = certificate
    try:
        link.send_control(message)
        await until(lambda: recorder.first("registered") or recorder.closed, 15, "the relay's answer")
    except Exception as exc:  # noqa: BLE001 - the TLS alert may surface here
        return exc
    if add is not None and recorder.first("registered"):  # then ask for one more on the live link
        link.send_control({"type": "add_resources", "resources": [{"name": add}]})
        await until(lambda: recorder.first("resources_added"), 15, "the relay's answer")
    if enroll is not None and recorder.first("registered"):  # renew over the live link with this CSR
        link.send_control({"type": "enroll", "csr": enroll})
        await until(lambda: recorder.first("enrolled") or recorder.first("enroll_failed"), 15, "the relay's answer")
    link.close()
    return recorder


def _refusal(recorder) -> str:
    assert isinstance(recorder, Recorder), recorder
    assert recorder.first("registered") is None, recorder.messages
    assert recorder.closed is not None and recorder.closed[0] == ErrorCode.UNAUTHORIZED, recorder.closed
    error = recorder.first("error")
    return f"{error['message']} ({error['code']})"


def test_hostile_certificates_are_refused(relay, tmp_path):
    customer = relay.create_customer("acme")
    other = relay.create_customer("globex")
    rid = relay.cli("resources", "create", "--customer-id", customer, "db").stdout.split()[0]
    foreign = relay.cli("resources", "create", "--customer-id", other, "theirs").stdout.split()[0]
    ca = _relay_ca(relay)
    good = _agent_cert(tmp_path, ca, customer=customer, resources=[rid], instance="inst-good")
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=3)
    cases = {
        "another CA": _agent_cert(tmp_path, _ca(), customer=customer, resources=[rid], instance="inst-ca"),
        "expired": _agent_cert(tmp_path, ca, customer=customer, resources=[rid], instance="inst-old", ttl=3600,
                               now=past),
        "another customer": _agent_cert(tmp_path, ca, customer=customer, resources=[foreign], instance="inst-cus"),
    }

    async def main():
        answers = {name: await _link_with(relay, f, k, ["db"]) for name, (f, k, _key) in cases.items()}
        answers["another resource"] = await _link_with(relay, good[0], good[1], ["db", "other"])
        # The relay-to-relay certificate: the same CA, clientAuth too, but not an agent's.
        peer = pki.ensure_peer_cert(relay.state_dir, ["127.0.0.1"])
        answers["not an agent"] = await _link_with(relay, *peer, ["db"])
        answers["good"] = await _link_with(relay, good[0], good[1], ["db"], add="other")
        # QUIC: the certificate in auth, its key proved by signing the relay's nonce.
        with open(cases["another CA"][0]) as f:
            answers["quic another CA"] = await _link_with(relay, "", "", ["db"], "quic", certificate=f.read())
        with open(cases["expired"][0]) as f:
            answers["quic expired"] = await _link_with(relay, "", "", ["db"], "quic", certificate=f.read())
        return answers

    answers = asyncio.run(main())
    for name in ("another CA", "expired"):
        # The relay's TLS layer fails the handshake: the dial fails, nothing registers.
        assert isinstance(answers[name], LinkError), (name, answers[name])
    assert "does not exist for customer" in _refusal(answers["another customer"])
    assert "allows resource db only, not other (unauthorized)" in _refusal(answers["another resource"])
    assert "not an agent certificate" in _refusal(answers["not an agent"])
    assert "not issued by this relay's CA" in _refusal(answers["quic another CA"])
    assert "the agent certificate has expired (unauthorized)" in _refusal(answers["quic expired"])
    good_answer = answers["good"]
    assert isinstance(good_answer, Recorder) and good_answer.first("registered"), good_answer
    assert good_answer.first("resources_added") == {"type": "resources_added", "resources": [], "refused": [
        {"name": "other", "code": "unauthorized", "message": "the agent certificate allows resource db only, not other"}]}
    log = relay.proc.log()
    assert "by certificate" in log and "Traceback" not in log


class CertLink(RecordingLink):
    """A stand-in link whose TLS layer verified ``peer_certificate``."""

    carrier = "wss"

    def __init__(self, peer_certificate: dict | None) -> None:
        super().__init__()
        self._peer = peer_certificate

    @property
    def peer_certificate(self) -> dict | None:
        return self._peer


def _peercert(customer: str, instance: str = "inst-r", serial: int = 0xABC) -> dict:
    """``getpeercert()`` of an agent certificate, as OpenSSL reports one it verified."""
    return {"subject": ((("organizationName", "tunnel-relay"),), (("organizationalUnitName", "agent"),),
                        (("commonName", instance),)),
            "subjectAltName": (("URI", f"tunnel:customer/{customer}"), ("URI", f"tunnel:instance/{instance}"),
                               ("URI", "tunnel:scope/customer")),
            "serialNumber": f"{serial:X}", "notAfter": "Jan  1 00:00:00 2100 GMT"}


def test_renewal_over_a_certificate_link_keeps_the_certificate_scope(relay, tmp_path):
    customer = relay.create_customer("acme")
    rid = relay.cli("resources", "create", "--customer-id", customer, "db").stdout.split()[0]
    cert_file, key_file, _key = _agent_cert(tmp_path, _relay_ca(relay), customer=customer, resources=[rid],
                                            instance="inst-r")
    recorder = asyncio.run(_link_with(relay, cert_file, key_file, ["db"], enroll=make_csr("inst-r")))
    enrolled = recorder.first("enrolled")
    assert enrolled is not None, recorder.messages
    renewed = x509.load_pem_x509_certificates(enrolled["certificate"].encode())[0]
    uris = renewed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier)
    assert uris == [f"tunnel:customer/{customer}", "tunnel:instance/inst-r", f"tunnel:resource/{rid}"]
    [listed] = json.loads(relay.cli("agents", "list", "--output", "json").stdout)
    assert (listed["serial"], listed["scope"], listed["resource_ids"]) == (
        format(renewed.serial_number, "x"), "resource", [rid])


async def _authenticate(tmp_path, revoked: bool, make=None, name: str = "acme"):
    """Authenticate one stand-in link in process: ``make(customer id)`` gives the link, its
    ``auth`` and how it answers the challenge (default: a TLS-verified certificate)."""
    state = await RelayState.open(tmp_path)
    customer = (await state.create_customer(name))["id"]
    link, auth, answer = make(customer) if make is not None else (CertLink(_peercert(customer)), None, None)
    if revoked:
        state.agent_certificate_revoked = lambda serial: serial == 0xABC
    registry = Registry("127.0.0.1")
    cluster = Cluster(state, registry, "wss://127.0.0.1:8443")
    await cluster.start()
    try:
        relay = Relay(state, TokenAuthority(tmp_path), registry, Limits(handshake_timeout=2.0), cluster=cluster)
        relay.state_dir = tmp_path
        handler = AgentLinkHandler(relay, link)
        link.set_handler(handler)
        message = auth or {"type": "auth", "agent": {"version": "0.1.0"}, "resources": [{"name": "db"}]}
        handler.control_received(message)
        if answer is not None:
            await until(lambda: any(m.get("type") == "prove" for m in link.sent), 5, "the challenge")
            nonce = base64.b64decode(next(m for m in link.sent if m.get("type") == "prove")["nonce"])
            handler.control_received({"type": "proof", "signature": answer(nonce)})
        await asyncio.gather(*relay.tasks)
        for agent in list(registry.agents):
            registry.remove_agent(agent)
            cluster.forget(agent)
    finally:
        await cluster.stop()
        await state.close()
    return link


def test_a_revoked_certificate_is_refused_with_a_clear_error(tmp_path):
    link = asyncio.run(_authenticate(tmp_path / "revoked", revoked=True))
    assert link.sent == [{"type": "error", "code": "revoked",
                          "message": "the certificate of agent instance inst-r is revoked: enrol again with a "
                                     "registration JWT"}]
    assert link.closed[0] == ErrorCode.UNAUTHORIZED
    # The same certificate, not revoked, registers.
    link = asyncio.run(_authenticate(tmp_path / "valid", revoked=False))
    assert link.sent[0]["type"] == "registered" and link.closed is None


def test_quic_proof_of_the_key_must_verify(tmp_path):
    pki.ensure_pki(tmp_path)
    ca = (x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes()),
          serialization.load_pem_private_key((tmp_path / "ca-key.pem").read_bytes(), None))

    def run(sign):
        def make(customer):
            cert_file, _key_file, key = _agent_cert(tmp_path, ca, customer=customer, resources=None,
                                                    instance=f"inst-q{len(outcomes)}")
            auth = {"type": "auth", "agent": {"version": "0.1.0"}, "resources": [{"name": "db"}],
                    "certificate": open(cert_file).read()}
            # QUIC: no certificate at the TLS layer.
            return RecordingLink(), auth, lambda nonce: sign(key, nonce)
        return asyncio.run(_authenticate(tmp_path, False, make, name=f"acme-{len(outcomes)}"))

    outcomes = []
    sig = lambda key, data: base64.b64encode(key.sign(data, ec.ECDSA(hashes.SHA256()))).decode()  # noqa: E731
    outcomes.append(run(lambda key, nonce: sig(key, PROOF_CONTEXT + nonce)))
    outcomes.append(run(lambda key, nonce: sig(key, PROOF_CONTEXT + b"another nonce")))
    outcomes.append(run(lambda key, nonce: sig(ec.generate_private_key(ec.SECP256R1()), PROOF_CONTEXT + nonce)))
    good, replayed, stolen = outcomes
    assert [m["type"] for m in good.sent][:2] == ["prove", "registered"] and good.closed is None
    for link in (replayed, stolen):
        assert link.sent[-1] == {"type": "error", "code": "unauthorized",
                                 "message": "the proof of the agent certificate's key does not verify"}
        assert link.closed[0] == ErrorCode.UNAUTHORIZED
