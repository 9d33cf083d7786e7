"""Probes of the path from the agent to the relay, for ``tunnel-agent check``.

Each probe takes the agent's :class:`~tunnel.bridge.dial.Dialer` (so it goes the way the agent
goes: through the ``HTTPS_PROXY`` CONNECT proxy unless ``NO_PROXY`` exempts the relay, with the
agent's trust anchors and TLS settings) and reports facts, never advice: what to tell the user
is the caller's business.

- :func:`relay_proxy`: the proxy the agent's WSS link would use, or None.
- :func:`proxy_connect`: TCP to that proxy, then ``CONNECT host:port``.
- :func:`tcp_connect`: a TCP connection to the relay (through the proxy when there is one).
- :func:`tls_handshake`: the TLS handshake the WSS link makes; when the certificate is not
  trusted, a second, unverified handshake fetches the certificate so the caller can say why.
- :func:`read_ca_file`: the subjects and key identifiers of the certificates in a CA file.
- :func:`tls_engine`: the TLS engine the WSS link runs on (:mod:`tunnel.carriers.tls`).
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import re
import socket
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

from tunnel.carriers import tls
from tunnel.carriers.proxy import dial_tcp, open_connect_tunnel, proxy_for, redact
from tunnel.wire.errors import LinkError

from .dial import Dialer

__all__ = ["CertFacts", "ProxyOutcome", "TlsOutcome", "proxy_connect", "read_ca_file", "redact",
           "relay_proxy", "tcp_connect", "tls_engine", "tls_handshake"]

# OpenSSL's X509_V_ERR_* codes that ``ssl.SSLCertVerificationError.verify_code`` carries.
CERT_EXPIRED = 10
CERT_NOT_YET_VALID = 9
HOSTNAME_MISMATCH = 62
IP_MISMATCH = 64
UNTRUSTED_CODES = frozenset({18, 19, 20, 21, 2})  # self-signed, unknown issuer, cannot verify


@dataclass(frozen=True)
class CertFacts:
    """What a certificate says about itself."""

    subject: str
    issuer: str
    names: tuple[str, ...]
    not_before: _dt.datetime
    not_after: _dt.datetime
    #: The issuer's key identifier (hex, from the authority key identifier), "" when absent.
    issuer_key_id: str = ""


@dataclass(frozen=True)
class TlsOutcome:
    """A TLS handshake with the relay: ``trusted`` or why not."""

    trusted: bool
    version: str = ""
    cert: CertFacts | None = None
    verify_code: int | None = None
    verify_message: str = ""
    #: A failure other than certificate verification (not TLS, handshake refused, ...).
    error: str = ""


@dataclass(frozen=True)
class ProxyOutcome:
    """``CONNECT`` through the proxy: ``reachable`` (TCP to the proxy), ``status`` (its answer)."""

    proxy: str  # redacted: no credentials
    reachable: bool
    allowed: bool
    status: int | None = None
    error: str = ""


def relay_proxy(dialer: Dialer) -> str | None:
    """The CONNECT proxy the agent's WSS link takes to the relay (``quic://`` never takes one)."""
    if dialer.scheme == "quic":
        return None
    return proxy_for(dialer.host, dialer.port, dialer.environ)


async def _open_tcp(host: str, port: int, timeout: float) -> socket.socket:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        return await dial_tcp(loop, host, port)


_STATUS = re.compile(r"HTTP/1\.\d (\d{3})|\((\d{3})\)")


async def proxy_connect(proxy: str, host: str, port: int, timeout: float) -> ProxyOutcome:
    """TCP to ``proxy``, then ``CONNECT host:port`` as the agent sends it."""
    shown = redact(proxy)
    try:
        url = urlsplit(proxy if "://" in proxy else "http://" + proxy)
        proxy_host, proxy_port = url.hostname, url.port or 80
    except ValueError:
        return ProxyOutcome(shown, False, False, error=f"invalid proxy URL {shown}")
    try:
        (await _open_tcp(proxy_host or "", proxy_port, timeout)).close()
    except (OSError, TimeoutError) as exc:
        return ProxyOutcome(shown, False, False, error=_os_error(exc))
    try:
        sock = await open_connect_tunnel(proxy, host, port, timeout)
    except LinkError as exc:
        # The carrier's message quotes the proxy's status line ("... 403 Forbidden") or "(407)".
        match = _STATUS.search(str(exc))
        status = int(match.group(1) or match.group(2)) if match else None
        return ProxyOutcome(shown, True, False, status=status, error=str(exc))
    sock.close()
    return ProxyOutcome(shown, True, True, status=200)


async def tcp_connect(dialer: Dialer, timeout: float) -> socket.socket:
    """A connected non-blocking socket to the relay's TCP port, the way the WSS link dials it.
    Raises ``OSError``, ``TimeoutError`` or ``LinkError`` (proxy)."""
    proxy = relay_proxy(dialer)
    if proxy:
        return await open_connect_tunnel(proxy, dialer.host, dialer.port, timeout)
    return await _open_tcp(dialer.host, dialer.port, timeout)


def tls_engine() -> str:
    """The TLS engine the WSS link runs on, in words (:func:`tunnel.carriers.tls.describe`)."""
    return tls.describe()


async def tls_handshake(dialer: Dialer, timeout: float) -> TlsOutcome:
    """The WSS link's TLS handshake (TLS 1.3, the agent's trust anchors, the URL's host name, the
    link's TLS engine).
    Raises what :func:`tcp_connect` raises when the relay cannot be reached at all."""
    try:
        context = dialer.ssl_context()
    except (OSError, ssl.SSLError) as exc:
        return TlsOutcome(False, error=f"cannot load the CA file {dialer.ca_file}: {exc}")
    try:
        der, version = await _handshake(dialer, context, timeout)
    except ssl.SSLCertVerificationError as exc:
        unverified = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        unverified.check_hostname = False
        unverified.verify_mode = ssl.CERT_NONE
        cert = None
        try:
            der, _ = await _handshake(dialer, unverified, timeout)
            cert = _facts(der)
        except (OSError, TimeoutError, ssl.SSLError, LinkError, ValueError):
            pass
        return TlsOutcome(False, cert=cert, verify_code=exc.verify_code,
                          verify_message=str(exc.verify_message or exc.reason or exc))
    except ssl.SSLError as exc:
        return TlsOutcome(False, error=f"TLS handshake failed: {exc.reason or exc}")
    except ConnectionResetError:
        return TlsOutcome(False, error="the relay closed the connection during the TLS handshake")
    return TlsOutcome(True, version=version, cert=_facts(der))


async def _handshake(dialer: Dialer, context: ssl.SSLContext, timeout: float) -> tuple[bytes, str]:
    loop = asyncio.get_running_loop()
    sock = await tcp_connect(dialer, timeout)
    transport = None
    try:
        async with asyncio.timeout(timeout):
            transport, _ = await tls.create_connection(loop, asyncio.Protocol, sock=sock, ssl=context,
                                                       server_hostname=dialer.host)
        ssl_object = transport.get_extra_info("ssl_object")
        return ssl_object.getpeercert(binary_form=True) or b"", ssl_object.version() or ""
    except BaseException:
        if transport is None:
            sock.close()
        raise
    finally:
        if transport is not None:
            transport.abort()


def _facts(der: bytes) -> CertFacts:
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple(str(n.value) for n in san)
    except x509.ExtensionNotFound:
        names = ()
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    except x509.ExtensionNotFound:
        aki = None
    return CertFacts(_name(cert.subject), _name(cert.issuer), names,
                     cert.not_valid_before_utc, cert.not_valid_after_utc, _key_id(aki))


def _key_id(raw: bytes | None) -> str:
    """A key identifier as people compare them: the first 8 bytes in hex, colon-separated."""
    return ":".join(f"{b:02x}" for b in raw[:8]) if raw else ""


def _name(name) -> str:
    from cryptography.x509.oid import NameOID

    common = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(common[0].value) if common else name.rfc4514_string()


def read_ca_file(path: str) -> list[tuple[str, str]]:
    """(subject common name, subject key identifier) of each certificate in the PEM file ``path``."""
    from cryptography import x509

    with open(path, "rb") as f:
        certs = x509.load_pem_x509_certificates(f.read())
    held = []
    for c in certs:
        try:
            ski = c.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
        except x509.ExtensionNotFound:
            ski = None
        held.append((_name(c.subject), _key_id(ski)))
    return held


def _os_error(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
