"""The relay's certificates: a private CA and a server certificate, created on first start.

Files in the state directory (directory mode 0700)::

    ca.pem           self-signed CA certificate, EC P-256 / ECDSA-SHA256, 10 years
                     (the trust anchor agents get through RELAY_CA_FILE)
    ca-key.pem       its private key, mode 0600
    server.pem       server certificate signed by the CA, ~1 year, SANs: localhost,
                     127.0.0.1, ::1, this host's name, plus the names asked for
    server-key.pem   its private key, mode 0600

The server certificate is issued again when it is missing, lacks a requested name, is not
signed by the current CA, or expires within 30 days. EC P-256 with ECDSA-SHA256 is what both
Python's ``ssl`` module and aioquic's TLS accept.

With ``--cert``/``--key`` the given files are served instead (``ca.pem`` is still written so a
trial set-up keeps working, but agents then trust whatever CA issued the given certificate).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import ipaddress
import logging
import os
import socket
import ssl
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from relay import CA_FILE

from .relay_state import ensure_state_dir, write_private

log = logging.getLogger("relay.pki")

CA_KEY_FILE = "ca-key.pem"
SERVER_CERT_FILE = "server.pem"
SERVER_KEY_FILE = "server-key.pem"
#: The certificate a relay presents to the other relays of its cluster, both ways (mutual
#: TLS on relay-to-relay links, relay.data.peering): clientAuth and serverAuth, OU "relay".
PEER_CERT_FILE = "peer.pem"
PEER_KEY_FILE = "peer-key.pem"
#: The role a peer certificate names (organizational unit of its subject).
PEER_ROLE = "relay"

CA_VALIDITY = _dt.timedelta(days=3650)
SERVER_VALIDITY = _dt.timedelta(days=365)
RENEW_BEFORE = _dt.timedelta(days=30)
BACKDATE = _dt.timedelta(minutes=5)


@dataclasses.dataclass(frozen=True, slots=True)
class Pki:
    ca_file: str
    cert_file: str
    key_file: str
    #: True when ``cert_file``/``key_file`` were given by the user (not issued by ``ca_file``).
    user_provided: bool = False


# --------------------------------------------------------------------------- names


def default_names() -> list[str]:
    names = ["localhost", "127.0.0.1", "::1"]
    try:
        hostname = socket.gethostname()
    except OSError:
        hostname = ""
    if hostname:
        names.append(hostname)
    return names


def _general_name(name: str) -> x509.GeneralName | None:
    """An IP or DNS SAN for ``name``; ``None`` for what makes no sense in a certificate
    (empty, the unspecified addresses 0.0.0.0 and ::)."""
    name = name.strip().strip("[]")
    if not name:
        return None
    try:
        ip = ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        pass
    else:
        return None if ip.is_unspecified else x509.IPAddress(ip)
    name = name.rstrip(".").lower()
    if not name or len(name) > 253 or any(c.isspace() or c in "/\\@:" for c in name):
        return None
    try:
        name.encode("ascii")
    except UnicodeEncodeError:
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    return x509.DNSName(name)


def _wanted_sans(extra_names: Iterable[str]) -> list[x509.GeneralName]:
    seen: list[x509.GeneralName] = []
    for name in [*default_names(), *extra_names]:
        general = _general_name(name) if name else None
        if general is not None and general not in seen:
            seen.append(general)
    return seen


# --------------------------------------------------------------------------- helpers


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load_cert(path: Path) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None


def _load_key(path: Path):
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None


def _same_public_key(cert: x509.Certificate, key) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        return cert.public_key().public_bytes(*fmt) == key.public_key().public_bytes(*fmt)
    except Exception:  # noqa: BLE001 - any mismatch in key types means "not the same"
        return False


# --------------------------------------------------------------------------- issuing


def _issue_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    hostname = socket.gethostname() or "localhost"
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    # Each relay state's CA named apart (a host's relays, a reset state): its key id in the name.
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tunnel-relay"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"tunnel-relay CA {ski.digest[:4].hex()} ({hostname})"[:64]),
        ]
    )
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_private(directory / CA_KEY_FILE, _key_pem(key))
    write_private(directory / CA_FILE, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    log.info("created a private CA in %s", directory / CA_FILE)
    return cert, key


def _issue_server(
    directory: Path,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    sans: list[x509.GeneralName],
    *,
    peer: bool = False,
) -> None:
    """Issue the server certificate, or with ``peer`` the relay-to-relay one (clientAuth too,
    OU ``relay``)."""
    key = _new_key()
    common_name = next((str(s.value) for s in sans if isinstance(s, x509.DNSName)), "localhost")
    now = _now()
    subject = [x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])]
    usages = [ExtendedKeyUsageOID.SERVER_AUTH]
    if peer:
        subject.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, PEER_ROLE))
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    cert_name, key_name = (PEER_CERT_FILE, PEER_KEY_FILE) if peer else (SERVER_CERT_FILE, SERVER_KEY_FILE)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(min(now + SERVER_VALIDITY, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    write_private(directory / key_name, _key_pem(key))
    write_private(directory / cert_name, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    log.info(
        "issued the %s certificate %s for %s",
        "relay-to-relay" if peer else "server",
        directory / cert_name,
        ", ".join(str(s.value) for s in sans),
    )


def _server_cert_reason(
    directory: Path, ca_cert: x509.Certificate, sans: list[x509.GeneralName], *, peer: bool = False
) -> str | None:
    """Why the server (or ``peer``) certificate must be issued again, or ``None`` when it is fine."""
    cert = _load_cert(directory / (PEER_CERT_FILE if peer else SERVER_CERT_FILE))
    key = _load_key(directory / (PEER_KEY_FILE if peer else SERVER_KEY_FILE))
    if cert is None or key is None:
        return "missing"
    if not _same_public_key(cert, key):
        return "key does not match"
    try:
        cert.verify_directly_issued_by(ca_cert)
    except Exception:  # noqa: BLE001 - ValueError/TypeError/InvalidSignature
        return "not issued by the current CA"
    if cert.not_valid_after_utc - _now() < RENEW_BEFORE:
        return "expires soon"
    try:
        present = set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        present = set()
    missing = [s for s in sans if s not in present]
    if missing:
        return "missing names " + ", ".join(str(s.value) for s in missing)
    return None


def ensure_pki(
    state_dir: str | os.PathLike,
    extra_names: Iterable[str] = (),
    *,
    cert_file: str | os.PathLike | None = None,
    key_file: str | os.PathLike | None = None,
) -> Pki:
    """Create or refresh the CA and server certificate in ``state_dir``; return the files to
    serve. ``extra_names`` (host names or IP literals; unspecified addresses are skipped) are
    added to the server certificate's SANs. With ``cert_file`` and ``key_file`` those are
    checked to load as a pair and returned instead of the generated server certificate.
    Raise ``ValueError`` with a clear message for unusable user files."""
    directory = ensure_state_dir(state_dir)
    ca_cert = _load_cert(directory / CA_FILE)
    ca_key = _load_key(directory / CA_KEY_FILE)
    if (
        ca_cert is None
        or ca_key is None
        or not _same_public_key(ca_cert, ca_key)
        or ca_cert.not_valid_after_utc - _now() < RENEW_BEFORE
    ):
        ca_cert, ca_key = _issue_ca(directory)
    ca_path = str(directory / CA_FILE)

    if (cert_file is None) != (key_file is None):
        raise ValueError("--cert and --key must be given together")
    if cert_file is not None and key_file is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(os.fspath(cert_file), os.fspath(key_file))
        except FileNotFoundError as exc:
            raise ValueError(f"cannot read {exc.filename}: file not found") from None
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(
                f"cannot use certificate {os.fspath(cert_file)} with key {os.fspath(key_file)}: "
                f"{getattr(exc, 'reason', None) or exc.__class__.__name__}"
            ) from None
        user_cert = _load_cert(Path(cert_file))
        if user_cert is not None and user_cert.not_valid_after_utc < _now():
            log.warning("the certificate %s has expired", os.fspath(cert_file))
        return Pki(ca_path, os.fspath(cert_file), os.fspath(key_file), user_provided=True)

    sans = _wanted_sans(extra_names)
    reason = _server_cert_reason(directory, ca_cert, sans)
    if reason is not None:
        if reason != "missing":
            log.info("issuing the server certificate again: %s", reason)
        # Keep the names an older certificate had (another --server-name given before).
        old = _load_cert(directory / SERVER_CERT_FILE)
        if old is not None and reason.startswith("missing names"):
            try:
                for name in old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value:
                    if name not in sans:
                        sans.append(name)
            except x509.ExtensionNotFound:
                pass
        _issue_server(directory, ca_cert, ca_key, sans)
    return Pki(ca_path, str(directory / SERVER_CERT_FILE), str(directory / SERVER_KEY_FILE))


def ensure_peer_cert(state_dir: str | os.PathLike, names: Iterable[str]) -> tuple[str, str]:
    """The relay-to-relay certificate and key files in ``state_dir`` (issued by the cluster CA,
    again when a name in ``names`` is missing or the CA changed); call after :func:`ensure_pki`."""
    directory = ensure_state_dir(state_dir)
    ca_cert = _load_cert(directory / CA_FILE)
    ca_key = _load_key(directory / CA_KEY_FILE)
    if ca_cert is None or ca_key is None:
        raise ValueError(f"no CA in {directory}: cannot issue the relay-to-relay certificate")
    sans = _wanted_sans(names)
    reason = _server_cert_reason(directory, ca_cert, sans, peer=True)
    if reason is not None:
        _issue_server(directory, ca_cert, ca_key, sans, peer=True)
    return str(directory / PEER_CERT_FILE), str(directory / PEER_KEY_FILE)


# --------------------------------------------------------------------------- TLS contexts


def peer_server_ssl_context(cert_file: str, key_file: str, ca_file: str) -> ssl.SSLContext:
    """The relay-to-relay listener's context: TLS 1.3, and a client certificate from the
    cluster CA is required. OpenSSL checks the client certificate's purpose (clientAuth), which
    only relay-to-relay certificates carry: a relay's agent-facing server certificate, or any
    other certificate the CA issued for serving, is refused."""
    context = server_ssl_context(cert_file, key_file)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=ca_file)
    return context


def agent_server_ssl_context(cert_file: str | os.PathLike, key_file: str | os.PathLike,
                             ca_file: str | os.PathLike) -> ssl.SSLContext:
    """The agent listener's context: TLS 1.3, serving ``cert_file``, and asking for (not
    requiring) a client certificate, verified by OpenSSL with the relay's CA (``ca_file``) as
    its only trust anchor and clientAuth as its purpose: enrolled agents link with theirs,
    agents with a registration JWT send none. A certificate that fails verification (another
    CA, expired) fails the handshake."""
    context = server_ssl_context(cert_file, key_file)
    context.verify_mode = ssl.CERT_OPTIONAL
    context.load_verify_locations(cafile=os.fspath(ca_file))
    return context


def peer_client_ssl_context(cert_file: str, key_file: str, ca_file: str) -> ssl.SSLContext:
    """The context a relay dials another with: verifies the peer's certificate and host name
    against the cluster CA, and presents this relay's relay-to-relay certificate."""
    context = client_ssl_context(ca_file)
    context.load_cert_chain(cert_file, key_file)
    return context


def peer_role(cert: dict | None) -> str | None:
    """The role (OU) a peer certificate names, from ``SSLSocket.getpeercert()``'s dict."""
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "organizationalUnitName":
                return value
    return None


def server_ssl_context(cert_file: str | os.PathLike, key_file: str | os.PathLike) -> ssl.SSLContext:
    """Server-side context, TLS 1.3 only, serving ``cert_file``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(os.fspath(cert_file), os.fspath(key_file))
    return context


def client_ssl_context(ca_file: str | os.PathLike | None = None) -> ssl.SSLContext:
    """Client-side context, TLS 1.3 only, certificate and host name verified; trusts
    ``ca_file`` or, when ``None``, the system store."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    if ca_file is None:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        context.load_verify_locations(cafile=os.fspath(ca_file))
    return context
