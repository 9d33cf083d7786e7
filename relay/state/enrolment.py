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

import base64
import dataclasses
import datetime as _dt
import ssl

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

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


# --------------------------------------------------------------------------- links by certificate

#: What an agent signs, followed by the relay's nonce, to prove it holds its certificate's key
#: when TLS did not carry the certificate (QUIC: docs/PROTOCOL.md, "Enrolment").
PROOF_CONTEXT = b"tunnel agent certificate proof v1\x00"
#: Bytes of the nonce an agent signs.
NONCE_SIZE = 32


@dataclasses.dataclass(frozen=True)
class AgentIdentity:
    """Who a verified agent certificate says the agent is: its customer, its instance, the
    resources it may serve (None: every resource of the customer), serial and end (Unix s)."""

    customer_id: str
    instance: str
    resource_ids: tuple[str, ...] | None
    serial: int
    not_after: int


def _identity(role: str | None, uris: list[str], serial: int, not_after: int) -> AgentIdentity:
    if role != AGENT_ROLE:
        raise EnrolmentRefused("the client certificate is not an agent certificate")
    customers = [u[len("tunnel:customer/"):] for u in uris if u.startswith("tunnel:customer/")]
    instances = [u[len("tunnel:instance/"):] for u in uris if u.startswith("tunnel:instance/")]
    resources = tuple(u[len("tunnel:resource/"):] for u in uris if u.startswith("tunnel:resource/"))
    wide = "tunnel:scope/customer" in uris
    if len(customers) != 1 or len(instances) != 1 or not customers[0] or not instances[0] or wide == bool(resources):
        raise EnrolmentRefused("the agent certificate does not name one customer, one instance and its scope")
    return AgentIdentity(customers[0], instances[0], None if wide else resources, serial, not_after)


def identity_from_peercert(cert: dict) -> AgentIdentity:
    """The identity in a certificate OpenSSL verified at the TLS layer (``getpeercert()``'s
    dict); :class:`EnrolmentRefused` when it is not an agent certificate of this relay's CA."""
    role = next((value for rdn in cert.get("subject", ()) for key, value in rdn
                 if key == "organizationalUnitName"), None)
    uris = [value for kind, value in cert.get("subjectAltName", ()) if kind == "URI"]
    try:
        serial = int(cert.get("serialNumber", ""), 16)
        not_after = int(ssl.cert_time_to_seconds(cert["notAfter"]))
    except (KeyError, TypeError, ValueError):
        raise EnrolmentRefused("the client certificate lacks a serial number or an end of validity") from None
    return _identity(role, uris, serial, not_after)


def verify_presented(chain_pem, ca_cert: x509.Certificate, now: _dt.datetime | None = None) -> tuple[AgentIdentity, object]:
    """Verify a certificate an agent sent in ``auth`` (PEM, the agent's first) against the
    relay's CA as the only trust anchor (path, validity, clientAuth usage), as OpenSSL does
    for one presented at the TLS layer; return its identity and public key (which must then
    sign the relay's nonce). :class:`EnrolmentRefused` says why it is refused."""
    if not isinstance(chain_pem, str) or not chain_pem or len(chain_pem) > 4 * MAX_CSR_SIZE:
        raise EnrolmentRefused("certificate must be a PEM certificate chain")
    try:
        chain = x509.load_pem_x509_certificates(chain_pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise EnrolmentRefused("certificate is not a PEM certificate chain") from None
    leaf = chain[0]
    now = now or _dt.datetime.now(_dt.timezone.utc)
    if now >= leaf.not_valid_after_utc:
        raise EnrolmentRefused("the agent certificate has expired")
    try:
        PolicyBuilder().store(Store([ca_cert])).time(now).build_client_verifier().verify(leaf, chain[1:])
    except VerificationError:
        raise EnrolmentRefused("the agent certificate was not issued by this relay's CA (or is not valid now)") from None
    try:
        uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    role = next((a.value for a in leaf.subject if a.oid == NameOID.ORGANIZATIONAL_UNIT_NAME), None)
    return _identity(role, uris, leaf.serial_number, int(leaf.not_valid_after_utc.timestamp())), leaf.public_key()


def check_proof(public_key, nonce: bytes, signature) -> None:
    """:class:`EnrolmentRefused` unless ``signature`` (base64) is the agent key's signature of
    :data:`PROOF_CONTEXT` + ``nonce``."""
    try:
        raw = base64.b64decode(signature, validate=True) if isinstance(signature, str) and len(signature) < 2048 else b""
        data = PROOF_CONTEXT + nonce
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(raw, data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(raw, data)
        else:
            raise EnrolmentRefused("links prove EC or Ed25519 agent keys only")
    except (InvalidSignature, ValueError):
        raise EnrolmentRefused("the proof of the agent certificate's key does not verify") from None
