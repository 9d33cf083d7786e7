"""The TLS engine under the WSS carrier (tunnel.carriers.tls): the compiled OpenSSL transports by
default on both ends, the loop's own selectable by ``TUNNEL_TLS_ENGINE=ssl``, the two
interoperating, certificate and host name checks unchanged, and a peer that gives up in the
middle of the handshake reported by the carrier alone (no traceback from the loop's handler)."""

from __future__ import annotations

import asyncio
import os
import pathlib
import ssl
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.adapters.test_wss import LIMITS, Server, connect  # noqa: E402
from tests.helpers import async_wait_until, make_pki  # noqa: E402
from tunnel.carriers import tls  # noqa: E402
from tunnel.carriers.handshakes import FAILURES  # noqa: E402
from tunnel.carriers.wss import open_wss_pipe  # noqa: E402
from tunnel.wire.errors import LinkError  # noqa: E402


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def engine():
    """Restores the engine of the environment after a test that selects one."""
    before = tls.engine()
    yield tls.select
    tls.select(before)


def _on_engine(pipe) -> bool:
    return type(pipe.transport).__module__.startswith("aiofastnet.")


def test_openssl_engine_is_the_default_on_both_ends(run, pki, engine):
    assert engine("openssl") == "openssl"

    async def main():
        async with Server(pki) as server:
            pipe, rec = await connect(server, pki)
            data = os.urandom(3 * 1024 * 1024)
            pipe.write([data])
            await rec.wait_bytes(len(data))
            assert rec.data == data
            assert _on_engine(pipe) and _on_engine(server.pipes[0])
            assert pipe.transport.get_extra_info("peercert")["subjectAltName"]
            pipe.close()
            assert await asyncio.wait_for(rec.lost, 30) is None
    run(main())


@pytest.mark.parametrize("server_engine, client_engine", [("ssl", "ssl"), ("ssl", "openssl"), ("openssl", "ssl")])
def test_engines_selectable_and_interoperate(run, pki, engine, server_engine, client_engine):
    async def main():
        engine(server_engine)
        async with Server(pki) as server:
            engine(client_engine)
            pipe, rec = await connect(server, pki)
            data = os.urandom(1024 * 1024)
            pipe.write([data])
            await rec.wait_bytes(len(data))
            assert rec.data == data
            assert _on_engine(pipe) is (client_engine == "openssl")
            assert _on_engine(server.pipes[0]) is (server_engine == "openssl")
            pipe.abort()
    run(main())


def test_certificate_and_host_name_checked_on_the_engine(run, pki, tmp_path, engine):
    engine("openssl")
    localhost_only = make_pki(tmp_path, names=("localhost",))

    async def main():
        async with Server(pki) as server:
            with pytest.raises(LinkError) as info:
                await open_wss_pipe(server.url, ssl_context=ssl.create_default_context(), limits=LIMITS, timeout=10)
            assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
            assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)  # what the agent's hints look for
        async with Server(localhost_only) as server:
            with pytest.raises(LinkError) as info:
                await open_wss_pipe(f"wss://127.0.0.1:{server.port}", ssl_context=localhost_only.client_context(),
                                    limits=LIMITS, timeout=10)
            assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
            assert "ip address mismatch" in str(info.value).lower(), info.value
    run(main())


def test_peer_leaving_mid_handshake_is_no_loop_error(run, pki, engine):
    """The engine hands such a failure to the loop's handler with the exception class (as
    asyncio's TLS protocol does), which logs a broken traceback; the carrier already reports it."""
    engine("openssl")

    async def main():
        loop = asyncio.get_running_loop()
        reports = []
        loop.set_exception_handler(lambda _loop, context: reports.append(context))
        failed = FAILURES["wss", "tls"]
        async with Server(pki) as server:
            for payload in (b"", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc" + os.urandom(50)):
                _, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(payload)
                writer.close()
            await async_wait_until(lambda: FAILURES["wss", "tls"] >= failed + 2, 30, what="both handshakes failed")
            # Something else that goes wrong still reaches the handler.
            loop.call_exception_handler({"message": "unrelated"})
        assert [r["message"] for r in reports] == ["unrelated"], reports
    run(main())


def test_setting_names_the_engine():
    def engine_of(value: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, TUNNEL_TLS_ENGINE=value, PYTHONPATH=str(ROOT))
        return subprocess.run([sys.executable, "-c", "from tunnel.carriers import tls; print(tls.engine())"],
                              env=env, capture_output=True, text=True, timeout=60)

    assert engine_of("ssl").stdout.strip() == "ssl"
    assert engine_of("").stdout.strip() == "openssl"
    bad = engine_of("boringssl")
    assert bad.returncode != 0 and "TUNNEL_TLS_ENGINE must be one of openssl, ssl" in bad.stderr


SERVE_ONE = """
import asyncio, sys
import uvloop
from tests.helpers import make_pki
from tunnel.carriers import tls
from tunnel.carriers.wss import serve_wss_pipes
from tunnel.core.limits import Limits

async def main():
    if sys.argv[2:] == ["prefer"]:
        tls.prefer_aes128()  # as tunnel-relay serve does at start
    pki = make_pki(__import__("pathlib").Path(sys.argv[1]))
    done = asyncio.get_running_loop().create_future()

    def on_pipe(pipe, slot):
        slot.release()
        done.set_result(pipe.transport.get_extra_info("cipher")[0])

    server = await serve_wss_pipes("127.0.0.1", 0, ssl_context=pki.server_context(), limits=Limits(), on_pipe=on_pipe)
    print(server.sockets[0].getsockname()[1], flush=True)
    print(await asyncio.wait_for(done, 60), flush=True)

uvloop.run(main())
"""


AES256_FIRST = """openssl_conf = openssl_init
[openssl_init]
ssl_conf = ssl_sect
[ssl_sect]
system_default = system_default_sect
[system_default_sect]
Ciphersuites = TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256
"""


@pytest.mark.parametrize("conf, prefer, suite", [
    (None, False, "TLS_AES_256_GCM_SHA384"),  # OpenSSL's own first choice
    (None, True, "TLS_AES_128_GCM_SHA256"),  # the relay's default
    ("deploy/openssl/tls13-aes128.cnf", False, "TLS_AES_128_GCM_SHA256"),
    ("deploy/openssl/tls13-aes128.cnf", True, "TLS_AES_128_GCM_SHA256"),
    ("aes256-first.cnf", True, "TLS_AES_256_GCM_SHA384"),  # an operator's own Ciphersuites stand
])
def test_relay_openssl_configuration_picks_the_suite(run, tmp_path, conf, prefer, suite):
    """The relay (the server chooses) makes every link AES-128-GCM by default through
    ``tls.prefer_aes128`` or with deploy/openssl/tls13-aes128.cnf; a configuration that orders
    the TLS 1.3 suites itself is left alone; the agent's process is left as it is."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("OPENSSL_CONF", None)
    if conf == "aes256-first.cnf":
        (tmp_path / conf).write_text(AES256_FIRST)
        env["OPENSSL_CONF"] = str(tmp_path / conf)
    elif conf:
        env["OPENSSL_CONF"] = str(ROOT / conf)
    server = subprocess.Popen([sys.executable, "-c", SERVE_ONE, str(tmp_path), "prefer" if prefer else "-"], env=env,
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        port = int(server.stdout.readline())
        ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))

        async def main():
            pipe = await open_wss_pipe(f"wss://localhost:{port}", ssl_context=ctx, limits=LIMITS, timeout=30)
            try:
                return pipe.transport.get_extra_info("cipher")[0]
            finally:
                pipe.abort()
        assert run(main()) == suite
        assert server.stdout.readline().strip() == suite
    finally:
        server.kill()
        server.wait(30)


KEEPS_THE_REST = """
import ssl
from tunnel.carriers import tls
assert tls.prefer_aes128()
context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
print(context.maximum_version.name, [c["name"] for c in context.get_ciphers()][:3])
"""


def test_preferring_aes128_keeps_the_rest_of_the_configuration(tmp_path):
    """Only the suite order changes: the other settings of the process's OpenSSL configuration
    (here a maximum protocol version) still apply to the contexts made after it."""
    conf = tmp_path / "openssl.cnf"
    conf.write_text(AES256_FIRST.replace("Ciphersuites = " + AES256_FIRST.rpartition("= ")[2], "MaxProtocol = TLSv1.2\n"))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OPENSSL_CONF=str(conf))
    out = subprocess.run([sys.executable, "-c", KEEPS_THE_REST], env=env, capture_output=True, text=True, timeout=60,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split(None, 1) == [
        "TLSv1_2", "['TLS_AES_128_GCM_SHA256', 'TLS_AES_256_GCM_SHA384', 'TLS_CHACHA20_POLY1305_SHA256']\n"]


def test_bad_engine_setting_stops_the_agent_with_a_clear_error():
    env = dict(os.environ, TUNNEL_TLS_ENGINE="boringssl", PYTHONPATH=str(ROOT), RELAY_URL="wss://127.0.0.1:1",
               REGISTRATION_JWT="a.b.c", NAME="x", APP_HOST="127.0.0.1", APP_PORT="1")
    out = subprocess.run([sys.executable, "-m", "agent"], env=env, capture_output=True, text=True, timeout=60,
                         cwd=ROOT)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == "tunnel-agent: TUNNEL_TLS_ENGINE must be one of openssl, ssl, got 'boringssl'"
