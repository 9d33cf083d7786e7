"""The QUIC carrier (tunnel.quic) on loopback, under plain asyncio and uvloop."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os

import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tunnel.carrier import LinkHandler, StreamHandler
from tunnel.config import Limits
from tunnel.constants import ErrorCode
from tunnel.errors import LinkError
from tunnel.quic import connect_quic, serve_quic

pytestmark = pytest.mark.timeout(60)

KiB = 1024
MiB = 1024 * KiB


# --- certificates ----------------------------------------------------------------------

def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(directory, name: str = "test-ca"):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    path = os.path.join(directory, f"{name}.pem")
    with open(path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert, path


def make_server_cert(directory, ca_key, ca_cert):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name("localhost")).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    cert_path = os.path.join(directory, "server.pem")
    key_path = os.path.join(directory, "server.key")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    ca_key, ca_cert, ca_path = make_ca(str(d))
    cert_path, key_path = make_server_cert(str(d), ca_key, ca_cert)
    _, _, other_ca = make_ca(str(d), "other-ca")
    return {"ca": ca_path, "cert": cert_path, "key": key_path, "other_ca": other_ca}


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request):
    """Run a coroutine on a fresh loop of the parametrised flavour."""

    def runner(coro):
        if request.param == "uvloop":
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
                return r.run(coro)
        with asyncio.Runner() as r:
            return r.run(coro)

    return runner


# --- helpers ---------------------------------------------------------------------------

async def wait_for(predicate, timeout: float = 20.0, what: str = "condition"):
    """Wait on a condition with a deadline (polling the loop, never a fixed sleep)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


class Recorder(LinkHandler):
    def __init__(self, on_stream=None):
        self.controls = []
        self.closed = None
        self.streams = []
        self.on_stream = on_stream
        self.event = asyncio.Event()

    def stream_opened(self, stream):
        handler = self.on_stream(stream) if self.on_stream else Collect(stream)
        self.streams.append((stream, handler))
        self.event.set()
        return handler

    def control_received(self, message):
        self.controls.append(message)
        self.event.set()

    def link_closed(self, code, reason):
        self.closed = (code, reason)
        self.event.set()


class Collect(StreamHandler):
    """Collects and consumes everything; optionally echoes."""

    def __init__(self, stream=None, consume=True, echo=False):
        self.stream = stream
        self.data = bytearray()
        self.eof = False
        self.reset = None
        self.is_closed = False
        self.writable_calls = 0
        self.consume = consume
        self.echo = echo

    def data_received(self, data):
        self.data += data
        if self.echo:
            self.stream.write(bytes(data))
        if self.consume:
            self.stream.consume(len(data))

    def eof_received(self):
        self.eof = True
        if self.echo:
            self.stream.write_eof()

    def reset_received(self, code):
        self.reset = code

    def writable(self):
        self.writable_calls += 1

    def closed(self):
        self.is_closed = True


async def pair(certs, limits=None, server_limits=None, on_link=None, **kw):
    """A server and a connected client link; returns (server, client_link, server_link, server_recorder)."""
    limits = limits or Limits()
    links = []

    def accept(link):
        rec = Recorder()
        link.set_handler(rec)
        link.handshake_done()
        links.append((link, rec))

    server = await serve_quic("127.0.0.1", 0, cert_file=certs["cert"], key_file=certs["key"],
                              limits=server_limits or limits, on_link=on_link or accept)
    client = await connect_quic("127.0.0.1", server.port, ca_file=certs["ca"], server_name="localhost",
                                limits=limits, timeout=10)
    if on_link is None:
        await wait_for(lambda: links, what="server link")
        return server, client, links[0][0], links[0][1]
    return server, client, None, None


# --- tests -----------------------------------------------------------------------------

def test_control_both_ways(run, certs):
    async def main():
        server, client, slink, srec = await pair(certs)
        crec = Recorder()
        client.set_handler(crec)
        assert client.transport == "quic" and client.version == 1
        client.send_control({"type": "auth", "token": "x"})
        await wait_for(lambda: srec.controls)
        assert srec.controls == [{"type": "auth", "token": "x"}]
        slink.send_control({"type": "registered", "agent_id": "a"})
        await wait_for(lambda: crec.controls)
        assert crec.controls == [{"type": "registered", "agent_id": "a"}]
        client.close(ErrorCode.NO_ERROR, "bye")
        await wait_for(lambda: srec.closed and crec.closed)
        assert srec.closed[0] == ErrorCode.NO_ERROR
        await client.wait_closed()
        server.close()
        await server.wait_closed()

    run(main())
