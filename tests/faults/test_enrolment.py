"""Enrolment over a live link, against a real relay: an agent registered with its JWT sends a
CSR (CONTROL ``enroll``) and gets a short-lived client certificate from the relay's CA that
names its customer, instance and the resources its token allows; hostile requests (another
subject, names asked for, a forged signature, a flood) get ``enroll_failed`` and nothing
else changes for the agent."""

from __future__ import annotations

import asyncio
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.faults.faultkit import register, until


def csr(cn: str = "inst-a", sans=None) -> str:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    request = builder.sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
    return request.public_bytes(serialization.Encoding.PEM).decode()


def test_a_registered_agent_gets_a_certificate_for_its_scope_only(relay):
    relay.stop()
    relay.start(RELAY_AGENT_CERT_TTL="3600")
    customer = relay.create_customer("acme")
    other = relay.create_customer("globex")
    rid = relay.cli("resources", "create", "--customer-id", customer, "db").stdout.split()[0]
    token = relay.jwt("--customer-id", customer, "--resource-id", rid)
    ca = x509.load_pem_x509_certificate(open(relay.ca_file, "rb").read())

    async def main():
        link, recorder = await register(relay, token, ["db"], instance="inst-a")
        assert recorder.first("registered"), recorder.messages

        async def ask(message: dict) -> dict:
            before = len(recorder.messages)
            link.send_control(message)
            await until(lambda: any(m.get("type", "").startswith("enroll") for m in recorder.messages[before:]),
                        10, "the relay's answer")
            return next(m for m in recorder.messages[before:] if m.get("type", "").startswith("enroll"))

        answers = {"good": await ask({"type": "enroll", "csr": csr()})}
        answers["flood"] = await ask({"type": "enroll", "csr": csr()})  # within ENROL_INTERVAL
        link.close()
        answers["hostile"] = []
        for request in (csr(cn="inst-b"), csr(sans=[x509.UniformResourceIdentifier(f"tunnel:customer/{other}")]),
                        "not a csr"):
            link, recorder = await register(relay, token, ["db"], instance="inst-a")
            answers["hostile"].append(await ask({"type": "enroll", "csr": request}))
            assert not recorder.closed  # the agent's link goes on
            link.close()
        return answers

    answers = asyncio.run(main())
    good = answers["good"]
    assert good["type"] == "enrolled", good
    cert = x509.load_pem_x509_certificates(good["certificate"].encode())[0]
    cert.verify_directly_issued_by(ca)
    uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier)
    assert uris == [f"tunnel:customer/{customer}", "tunnel:instance/inst-a", f"tunnel:resource/{rid}"]
    assert abs(good["expires_at"] - (time.time() + 3600)) < 120
    assert answers["flood"] == {"type": "enroll_failed", "code": "too_many",
                                "message": "one certificate per link every 10 s"}
    messages = [a["message"] for a in answers["hostile"]]
    assert [a["code"] for a in answers["hostile"]] == ["bad_request"] * 3
    assert "no subject but CN" in messages[0] and "no extensions" in messages[1] and "PEM" in messages[2]
    assert "Traceback" not in relay.proc.log()
