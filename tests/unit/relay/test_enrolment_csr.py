"""The relay CA signing agents' CSRs (relay.state.enrolment): the certificate says what the
registration allows, whatever the CSR asks."""

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from relay.state import pki
from relay.state.enrolment import EnrolmentRefused, issue_agent_certificate

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    pki.ensure_pki(directory)
    cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    key = serialization.load_pem_private_key((directory / "ca-key.pem").read_bytes(), None)
    return cert, key


def csr(key=None, cn: str | None = "inst-1", sans=None) -> str:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else []))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def issue(ca, request, **kw):
    args = {"customer_id": "cus_a", "resource_ids": ["res_1"], "instance": "inst-1", "now": NOW, **kw}
    return issue_agent_certificate(request, ca_cert=ca[0], ca_key=ca[1], **args)


def test_the_certificate_names_customer_scope_and_instance(ca):
    issued = issue(ca, csr())
    cert = x509.load_pem_x509_certificates(issued.certificate)[0]
    cert.verify_directly_issued_by(ca[0])
    uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier)
    assert uris == ["tunnel:customer/cus_a", "tunnel:instance/inst-1", "tunnel:resource/res_1"]
    assert cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.CLIENT_AUTH])
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.not_valid_after_utc - NOW == dt.timedelta(hours=24) == issued.not_after - NOW
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "agent"
    wide = x509.load_pem_x509_certificates(issue(ca, csr(cn=None), resource_ids=None, ttl=3600).certificate)[0]
    assert "tunnel:scope/customer" in wide.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier)


@pytest.mark.parametrize("request_, message", [
    (lambda: csr(sans=[x509.UniformResourceIdentifier("tunnel:customer/cus_b")]), "no extensions"),
    (lambda: csr(sans=[x509.DNSName("relay.example.com")]), "no extensions"),
    (lambda: csr(cn="someone-else"), "no subject but CN"),
    (lambda: csr(key=rsa.generate_private_key(65537, 1024)), "at least 2048 bits"),
    (lambda: csr(key=ec.generate_private_key(ec.SECP256K1())), "P-256 or P-384"),
    (lambda: "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", "not a PEM"),
    (lambda: "x" * 9000, "at most 8192"),
    (lambda: 42, "PEM certificate request"),
])
def test_hostile_requests_are_refused(ca, request_, message):
    with pytest.raises(EnrolmentRefused, match=message):
        issue(ca, request_())


def test_a_request_not_signed_by_its_key_is_refused(ca):
    good = x509.load_pem_x509_csr(csr().encode())
    der = bytearray(good.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # inside the signature
    import base64
    forged = ("-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(bytes(der)).decode()
              + "-----END CERTIFICATE REQUEST-----\n")
    with pytest.raises(EnrolmentRefused, match="signature does not verify|not a PEM"):
        issue(ca, forged)
