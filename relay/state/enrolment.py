"""Enrolment: the relay's CA issues an agent instance a short-lived client certificate from
its CSR (docs/PROTOCOL.md, "Enrolment").

The agent keeps its key; the relay reads only the public key and the proof of possession
(the CSR's signature) from the CSR. Everything the certificate says comes from the link's
verified registration, never from the CSR: subject ``O=tunnel-relay, OU=agent,
CN=<instance>``, SAN URIs ``tunnel:customer/<cus_…>``, ``tunnel:instance/<instance>`` and one
``tunnel:resource/<res_…>`` per resource the token allows (none for a customer-wide token:
``tunnel:scope/customer``), extended key usage clientAuth only, not a CA, valid ``ttl``
seconds (backdated 5 minutes for clock skew). A CSR that asks for anything (a subject other
than the instance, any extension) is refused: it cannot get more than its token allows, and
it is told so rather than silently given less.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: The role a client certificate of an agent names (organizational unit of its subject).
AGENT_ROLE = "agent"
#: Default lifetime of an agent certificate (s): ``serve --agent-cert-ttl``.
DEFAULT_TTL = 24 * 3600
MAX_TTL = 30 * 24 * 3600
#: Longest CSR accepted (PEM bytes).
MAX_CSR_SIZE = 8192
BACKDATE = _dt.timedelta(minutes=5)


class EnrolmentRefused(ValueError):
    """A CSR the relay will not sign; the message says why (safe to send to the agent)."""


@dataclasses.dataclass(frozen=True)
class Issued:
    certificate: bytes  # PEM: the agent's certificate, then the CA's
    serial: int
    not_after: _dt.datetime


def _check_key(key) -> None:
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ("secp256r1", "secp384r1"):
            raise EnrolmentRefused(f"EC keys must be P-256 or P-384, not {key.curve.name}")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise EnrolmentRefused(f"RSA keys must have at least 2048 bits, not {key.key_size}")
    elif not isinstance(key, ed25519.Ed25519PublicKey):
        raise EnrolmentRefused("the key must be EC P-256/P-384, RSA of 2048 bits or more, or Ed25519")


def issue_agent_certificate(csr_pem, *, ca_cert: x509.Certificate, ca_key, customer_id: str,
                            resource_ids: list[str] | None, instance: str, ttl: int = DEFAULT_TTL,
                            now: _dt.datetime | None = None) -> Issued:
    """Sign ``csr_pem`` for agent ``instance`` of ``customer_id``, scoped to ``resource_ids``
    (None: every resource of the customer, a customer-wide token). Raise
    :class:`EnrolmentRefused` for a CSR that is malformed, not self-signed, has a weak key, or
    asks for a subject or extensions."""
    if not isinstance(csr_pem, str) or not csr_pem or len(csr_pem) > MAX_CSR_SIZE:
        raise EnrolmentRefused(f"csr must be a PEM certificate request of at most {MAX_CSR_SIZE} bytes")
    if not 60 <= ttl <= MAX_TTL:
        raise ValueError(f"certificate lifetime must be 60 to {MAX_TTL} seconds")
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise EnrolmentRefused("csr is not a PEM certificate request") from None
    try:
        valid = csr.is_signature_valid
    except (ValueError, InvalidSignature):
        valid = False
    if not valid:
        raise EnrolmentRefused("the certificate request's signature does not verify (not signed by its own key)")
    try:
        key = csr.public_key()
    except ValueError:
        raise EnrolmentRefused("the certificate request's key cannot be read") from None
    _check_key(key)
    asked = [attr for attr in csr.subject if not (attr.oid == NameOID.COMMON_NAME and attr.value == instance)]
    if asked:
        raise EnrolmentRefused("the certificate request may name no subject but CN=<this agent's instance>: "
                               "the relay decides what the certificate says")
    if len(csr.extensions):
        raise EnrolmentRefused("the certificate request may carry no extensions (no names, no usages): the relay "
                               "grants what the registration token allows")
    now = now or _dt.datetime.now(_dt.timezone.utc)
    not_after = now + _dt.timedelta(seconds=ttl)
    uris = [f"tunnel:customer/{customer_id}", f"tunnel:instance/{instance}"]
    uris += [f"tunnel:resource/{rid}" for rid in resource_ids] if resource_ids is not None else ["tunnel:scope/customer"]
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tunnel-relay"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, AGENT_ROLE),
        x509.NameAttribute(NameOID.COMMON_NAME, instance[:64]),
    ])
    serial = x509.random_serial_number()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key)
        .serial_number(serial)
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM) + ca_cert.public_bytes(serialization.Encoding.PEM)
    return Issued(pem, serial, not_after)
