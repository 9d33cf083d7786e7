"""tunnel.bridge.dial.Dialer against real listeners on loopback (QUIC, TLS WebSocket, auto)."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_quic import Recorder, wait_for  # noqa: E402

from tunnel.bridge.dial import Dialer  # noqa: E402
from tunnel.carriers.quic import serve_quic  # noqa: E402
from tunnel.core.limits import Limits  # noqa: E402

pytestmark = pytest.mark.timeout(180)
LIMITS = Limits(handshake_timeout=10)
FAST = LIMITS.replace(quic_probe_timeout=1.5, quic_reprobe_interval=30)


def _accept(links):
    def on_link(link):
        link.set_handler(Recorder())
        link.handshake_done()
        links.append(link)
    return on_link


async def _serve_wss(certs, links, sock=None):
    from tunnel.carriers.wss import serve_wss

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(certs["cert"], certs["key"])
    server = await serve_wss("127.0.0.1", 0, ssl_context=ctx, limits=LIMITS, on_link=_accept(links), sock=sock)
    return server, server.sockets[0].getsockname()[1]


async def _serve_quic_beside_a_closed_tcp_port(certs, links):
    """A QUIC server, and a TCP socket bound to the same port number but not listening
    (connections to it are refused) that a WSS server can take later. Binding the TCP port
    only when it is needed failed now and then: a closed connection that had used the number
    as its ephemeral port still held it (TIME-WAIT)."""
    for _ in range(50):
        tcp = socket.socket()
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind(("127.0.0.1", 0))
        port = tcp.getsockname()[1]
        try:
            return await serve_quic("127.0.0.1", port, cert_file=certs["cert"], key_file=certs["key"],
                                    limits=LIMITS, on_link=_accept(links)), tcp
        except OSError:  # the UDP port is taken
            tcp.close()
    raise RuntimeError("no port free for both TCP and UDP")


def test_url_validation():
    with pytest.raises(ValueError):
        Dialer("http://relay:443", ca_file=None, limits=LIMITS)
    with pytest.raises(ValueError):
        Dialer("quic://:443", ca_file=None, limits=LIMITS)
    with pytest.raises(ValueError, match="has no port"):
        Dialer("wss://relay.example", ca_file=None, limits=LIMITS)
    d = Dialer("auto://relay.example:443", ca_file=None, limits=LIMITS, proxy_env={})
    assert (d.host, d.port, d.probe_timeout, d.reprobe_interval) == ("relay.example", 443, 3.0, 60.0)
    assert d.wss_url() == "wss://relay.example:443"
    assert d.next_probe_in(time.monotonic()) is None  # nothing dialled yet


def test_quic_scheme(certs):
    async def main():
        links = []
        server = await serve_quic("127.0.0.1", 0, cert_file=certs["cert"], key_file=certs["key"], limits=LIMITS,
                                  on_link=_accept(links))
        d = Dialer(f"quic://127.0.0.1:{server.port}", ca_file=certs["ca"], limits=LIMITS, proxy_env={})
        link = await d.dial()
        assert link.carrier == "quic" and d.carrier == "quic"
        await wait_for(lambda: links)
        assert d.next_probe_in(time.monotonic() + 1000) is None  # only auto re-probes
        link.close()
        server.close()

    asyncio.run(main())


def test_quic_scheme_unreachable_raises(certs):
    from tunnel.wire.errors import LinkError

    async def main():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        d = Dialer(f"quic://127.0.0.1:{port}", ca_file=certs["ca"], limits=Limits(handshake_timeout=2), proxy_env={})
        with pytest.raises(LinkError):
            await d.dial()

    asyncio.run(main())


def test_wss_scheme(certs):
    async def main():
        links = []
        server, port = await _serve_wss(certs, links)
        d = Dialer(f"wss://localhost:{port}", ca_file=certs["ca"], limits=LIMITS, proxy_env={})
        link = await d.dial()
        assert link.carrier == "wss"
        await wait_for(lambda: links)
        assert d.next_probe_in(time.monotonic() + 1000) is None  # only auto re-probes
        link.close()
        server.close()

    asyncio.run(main())


def test_auto_rides_wss(certs):
    """auto:// dials WSS and never tries QUIC while WSS works (the faster carrier: bench/)."""

    async def main():
        wss_links, quic_links = [], []
        server, port = await _serve_wss(certs, wss_links)
        quic = await serve_quic("127.0.0.1", port, cert_file=certs["cert"], key_file=certs["key"], limits=LIMITS,
                                on_link=_accept(quic_links))
        d = Dialer(f"auto://localhost:{port}", ca_file=certs["ca"], limits=FAST, proxy_env={})
        link = await d.dial()
        assert link.carrier == "wss" and d.carrier == "wss"
        await wait_for(lambda: wss_links)
        assert not quic_links and d.last_quic_error is None
        assert d.next_probe_in(time.monotonic() + 1000) is None  # on WSS: nothing to move to
        link.close()
        quic.close()
        server.close()

    asyncio.run(main())


def test_auto_falls_back_to_quic_then_reprobes_wss(certs):
    """TCP refused: auto:// rides QUIC; WSS is tried again on the re-probe interval and taken
    once it answers."""

    async def main():
        wss_links, quic_links = [], []
        quic, tcp = await _serve_quic_beside_a_closed_tcp_port(certs, quic_links)
        port = quic.port
        d = Dialer(f"auto://localhost:{port}", ca_file=certs["ca"], limits=FAST, proxy_env={})
        link = await d.dial()
        assert link.carrier == "quic" and d.carrier == "quic"
        assert d.last_wss_error
        await wait_for(lambda: quic_links)
        now = time.monotonic()
        assert d.next_probe_in(now) > 0
        assert d.next_probe_in(now + 31) == 0
        # Still no TCP listener: the probe fails, and the interval restarts.
        assert await d.probe_wss() is None
        assert d.next_probe_in(time.monotonic()) > 0
        # WSS comes up on the same port number: the next probe returns a ready link.
        server, _ = await _serve_wss(certs, wss_links, sock=tcp)
        wlink = await d.probe_wss()
        assert wlink is not None and wlink.carrier == "wss" and d.carrier == "wss"
        await wait_for(lambda: wss_links)
        assert d.next_probe_in(time.monotonic() + 1000) is None
        wlink.close()
        link.close()
        quic.close()
        server.close()

    asyncio.run(main())


def test_auto_with_both_unreachable_raises(certs):
    """No TCP listener and a UDP black hole: the QUIC attempt times out, and the error names both."""
    from tunnel.wire.errors import LinkError

    async def main():
        hole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        hole.bind(("127.0.0.1", 0))  # swallows every datagram; nothing listens on TCP there
        port = hole.getsockname()[1]
        try:
            d = Dialer(f"auto://localhost:{port}", ca_file=certs["ca"], limits=LIMITS.replace(quic_probe_timeout=0.5),
                       proxy_env={})
            with pytest.raises(LinkError, match="QUIC too"):
                await d.dial()
            assert d.last_wss_error and d.last_quic_error
        finally:
            hole.close()

    asyncio.run(main())
