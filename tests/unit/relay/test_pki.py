"""relay.state.pki: the private CA, the server certificate, and TLS 1.3 contexts that accept each other."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import stat

import pytest
from cryptography import x509

from relay.state import pki
from relay.state.pki import client_ssl_context, ensure_pki, server_ssl_context


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _sans(cert_file) -> list[str]:
    cert = x509.load_pem_x509_certificate(open(cert_file, "rb").read())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(n.value) for n in names]


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


async def _handshake(server_ctx, client_ctx, server_hostname: str, host: str = "127.0.0.1") -> str:
    async def echo(reader, writer):
        try:
            writer.write(await reader.readexactly(4))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(echo, host, 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=client_ctx, server_hostname=server_hostname), 30
        )
        version = writer.get_extra_info("ssl_object").version()
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 30) == b"ping"
        writer.close()
        return version
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki") / "state"
    return directory, ensure_pki(directory, extra_names=["relay.example.com", "0.0.0.0"])


def test_files_and_modes(generated):
    directory, keys = generated
    assert _mode(directory) == 0o700
    assert keys.ca_file == str(directory / "ca.pem")
    assert keys.cert_file == str(directory / "server.pem")
    assert keys.key_file == str(directory / "server-key.pem")
    assert not keys.user_provided
    assert _mode(directory / "ca-key.pem") == 0o600
    assert _mode(directory / "server-key.pem") == 0o600
    names = _sans(keys.cert_file)
    for name in ("localhost", "127.0.0.1", "::1", socket.gethostname().lower(), "relay.example.com"):
        assert name in names
    assert "0.0.0.0" not in names


def test_certificates_are_ec_p256_ecdsa_sha256(generated):
    from cryptography.hazmat.primitives.asymmetric import ec

    _, keys = generated
    for path in (keys.ca_file, keys.cert_file):
        cert = x509.load_pem_x509_certificate(open(path, "rb").read())
        assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
        assert cert.public_key().curve.name == "secp256r1"
        assert cert.signature_hash_algorithm.name == "sha256"
    ca = x509.load_pem_x509_certificate(open(keys.ca_file, "rb").read())
    leaf = x509.load_pem_x509_certificate(open(keys.cert_file, "rb").read())
    leaf.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert 360 <= lifetime.days <= 400
    assert (ca.not_valid_after_utc - ca.not_valid_before_utc).days >= 3600


@pytest.mark.parametrize("name", ["localhost", "127.0.0.1", "relay.example.com"])
def test_contexts_handshake_tls13_and_verify_the_name(generated, name):
    _, keys = generated
    server_ctx = server_ssl_context(keys.cert_file, keys.key_file)
    client_ctx = client_ssl_context(keys.ca_file)
    assert asyncio.run(_handshake(server_ctx, client_ctx, name)) == "TLSv1.3"


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback")
def test_ipv6_loopback_name_verifies(generated):
    _, keys = generated
    version = asyncio.run(
        _handshake(server_ssl_context(keys.cert_file, keys.key_file), client_ssl_context(keys.ca_file), "::1", "::1")
    )
    assert version == "TLSv1.3"


def test_other_names_and_other_trust_anchors_fail(generated, tmp_path):
    _, keys = generated
    server_ctx = server_ssl_context(keys.cert_file, keys.key_file)
    with pytest.raises(ssl.SSLCertVerificationError):
        asyncio.run(_handshake(server_ctx, client_ssl_context(keys.ca_file), "example.org"))
    other = ensure_pki(tmp_path / "other")
    with pytest.raises(ssl.SSLCertVerificationError):
        asyncio.run(_handshake(server_ctx, client_ssl_context(other.ca_file), "localhost"))
    with pytest.raises(ssl.SSLCertVerificationError):
        asyncio.run(_handshake(server_ctx, client_ssl_context(None), "localhost"))


def test_context_settings():
    client = client_ssl_context(None)
    assert client.verify_mode == ssl.CERT_REQUIRED
    assert client.check_hostname is True
    assert client.minimum_version == ssl.TLSVersion.TLSv1_3


def test_aioquic_accepts_the_certificates(generated):
    aioquic_tls = pytest.importorskip("aioquic.tls")
    from aioquic.quic.configuration import QuicConfiguration

    _, keys = generated
    server = QuicConfiguration(is_client=False)
    server.load_cert_chain(keys.cert_file, keys.key_file)
    leaf = x509.load_pem_x509_certificate(open(keys.cert_file, "rb").read())
    for name in ("localhost", "127.0.0.1"):
        aioquic_tls.verify_certificate(leaf, server_name=name, cafile=keys.ca_file)
    with pytest.raises(aioquic_tls.AlertBadCertificate):
        aioquic_tls.verify_certificate(leaf, server_name="example.org", cafile=keys.ca_file)


def test_second_start_keeps_the_files(tmp_path):
    first = ensure_pki(tmp_path / "s", ["a.example"])
    before = {p: open(p, "rb").read() for p in (first.ca_file, first.cert_file, first.key_file)}
    second = ensure_pki(tmp_path / "s", ["a.example"])
    assert second == first
    assert {p: open(p, "rb").read() for p in before} == before


def test_new_name_reissues_the_server_certificate_only(tmp_path):
    first = ensure_pki(tmp_path / "s", ["a.example"])
    ca_before = open(first.ca_file, "rb").read()
    cert_before = open(first.cert_file, "rb").read()
    ensure_pki(tmp_path / "s", ["b.example", "10.9.8.7"])
    assert open(first.ca_file, "rb").read() == ca_before
    assert open(first.cert_file, "rb").read() != cert_before
    names = _sans(first.cert_file)
    assert {"a.example", "b.example", "10.9.8.7"} <= set(names)
    assert _mode(first.key_file) == 0o600


def test_expiring_certificate_is_reissued(tmp_path, monkeypatch):
    import datetime

    monkeypatch.setattr(pki, "SERVER_VALIDITY", datetime.timedelta(days=10))
    keys = ensure_pki(tmp_path / "s")
    short = x509.load_pem_x509_certificate(open(keys.cert_file, "rb").read())
    monkeypatch.setattr(pki, "SERVER_VALIDITY", datetime.timedelta(days=365))
    ensure_pki(tmp_path / "s")
    renewed = x509.load_pem_x509_certificate(open(keys.cert_file, "rb").read())
    assert renewed.not_valid_after_utc > short.not_valid_after_utc + datetime.timedelta(days=300)


def test_new_ca_reissues_the_server_certificate(tmp_path):
    keys = ensure_pki(tmp_path / "s")
    os.unlink(keys.ca_file)
    os.unlink(tmp_path / "s" / "ca-key.pem")
    ensure_pki(tmp_path / "s")
    ca = x509.load_pem_x509_certificate(open(keys.ca_file, "rb").read())
    leaf = x509.load_pem_x509_certificate(open(keys.cert_file, "rb").read())
    leaf.verify_directly_issued_by(ca)


def test_user_provided_certificate(tmp_path):
    mine = ensure_pki(tmp_path / "mine", ["relay.example.com"])
    keys = ensure_pki(tmp_path / "s", cert_file=mine.cert_file, key_file=mine.key_file)
    assert keys.user_provided
    assert (keys.cert_file, keys.key_file) == (mine.cert_file, mine.key_file)
    assert os.path.exists(keys.ca_file) and keys.ca_file == str(tmp_path / "s" / "ca.pem")
    assert not (tmp_path / "s" / "server.pem").exists()
    version = asyncio.run(
        _handshake(server_ssl_context(keys.cert_file, keys.key_file), client_ssl_context(mine.ca_file), "localhost")
    )
    assert version == "TLSv1.3"


def test_user_provided_files_must_be_usable(tmp_path):
    a = ensure_pki(tmp_path / "a")
    b = ensure_pki(tmp_path / "b")
    with pytest.raises(ValueError, match="together"):
        ensure_pki(tmp_path / "s", cert_file=a.cert_file)
    with pytest.raises(ValueError, match="cannot use certificate"):
        ensure_pki(tmp_path / "s", cert_file=a.cert_file, key_file=b.key_file)
    with pytest.raises(ValueError, match="not found"):
        ensure_pki(tmp_path / "s", cert_file=tmp_path / "missing.pem", key_file=a.key_file)


def _mutual_handshake(server_context, client_context, server_name: str = "127.0.0.1"):
    """A real TLS handshake over loopback; the peer certificate the server saw, or the error."""
    import asyncio

    from tests.helpers.sync_state import new_loop

    async def go():
        seen = {}

        async def on_client(reader, writer):
            seen["cert"] = writer.get_extra_info("peercert")
            writer.write(b"ok")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(on_client, "127.0.0.1", 0, ssl=server_context)
        port = server.sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context,
                                                          server_hostname=server_name)
            data = await reader.read(2)
            writer.close()
            return seen.get("cert") if data == b"ok" else None
        except (ssl.SSLError, ConnectionError, OSError) as exc:
            return exc
        finally:
            server.close()

    loop = new_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(go(), 10))
    finally:
        loop.close()


def test_relay_to_relay_links_take_relay_certificates_only(tmp_path):
    """The peer listener requires a client certificate from the cluster CA valid for client
    authentication: a relay's relay-to-relay certificate passes and names the role "relay";
    its agent-facing server certificate (same CA) and no certificate at all are refused."""
    keys = pki.ensure_pki(tmp_path)
    cert, key = pki.ensure_peer_cert(tmp_path, ["127.0.0.1"])
    server = pki.peer_server_ssl_context(cert, key, keys.ca_file)
    seen = _mutual_handshake(server, pki.peer_client_ssl_context(cert, key, keys.ca_file))
    assert isinstance(seen, dict) and pki.peer_role(seen) == pki.PEER_ROLE
    as_server_cert = pki.peer_client_ssl_context(keys.cert_file, keys.key_file, keys.ca_file)
    assert not isinstance(_mutual_handshake(server, as_server_cert), dict)
    assert not isinstance(_mutual_handshake(server, pki.client_ssl_context(keys.ca_file)), dict)
    # Another cluster's relay (another CA) is refused too.
    other = pki.ensure_pki(tmp_path / "other")
    other_cert, other_key = pki.ensure_peer_cert(tmp_path / "other", ["127.0.0.1"])
    assert not isinstance(_mutual_handshake(server, pki.peer_client_ssl_context(other_cert, other_key, keys.ca_file)), dict)
    assert other.ca_file != keys.ca_file
