"""The agent's dialler for ``RELAY_URL``: ``quic://``, ``wss://`` or ``auto://host:port``.

``auto`` (the default) rides TLS WebSocket and keeps QUIC for when WSS cannot be dialled (TCP
to the relay blocked, a proxy that refuses), so it is never slower than ``wss://``. When WSS
fails, QUIC is tried with a short timeout (``Limits.quic_probe_timeout``, default 3 s); while
``auto`` rides QUIC, :meth:`Dialer.next_probe_in` counts down ``Limits.quic_reprobe_interval``
(default 60 s) and :meth:`Dialer.probe_wss` tries WSS once: the agent registers over the new
link and drains the QUIC one. Under ``auto`` a QUIC link keeps a shorter liveness bound,
``Limits.auto_quic_keepalive_timeout`` (default 4 s, PINGs every quarter of it; QUIC's idle
timeout is the same, and QUIC uses the smaller of both sides' values, so the relay gives up on
a silent path as soon): the next dial tries WSS first again.

The order is measured, not assumed (bench/README.md, issue 23): through the tunnel WSS moved
more than QUIC on loopback (one stream: QUIC 0.87x; pgbench, redis-benchmark and wrk through
``auto://`` when it chose QUIC: 0.33-0.40x of ``wss://``) and on the 50 ms / 1 Gbit/s path at
0, 0.1 and 1 % loss, for less CPU and memory. So the faster carrier comes first, and QUIC is
what reaches a relay whose TCP port is blocked.

The relay's certificate is always verified (``ca_file`` or the system store); WSS honours
``HTTPS_PROXY``/``NO_PROXY`` (HTTP CONNECT), QUIC never uses a proxy.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from tunnel.carriers.base import Link
from tunnel.core.limits import Limits
from tunnel.wire.errors import LinkError

__all__ = ["Dialer", "RELAY_DEFAULT_PORT", "RelayUrl", "dial_tls_link", "parse_relay_url"]

log = logging.getLogger("tunnel.bridge.dial")

SCHEMES = ("quic", "wss", "auto")
#: The relay's agent port when its operator chose none (tunnel-relay serve --listen).
RELAY_DEFAULT_PORT = 8443
#: Schemes people write by habit, and the one they meant.
_SCHEME_HINTS = {"https": "wss", "ws": "wss", "http": "wss", "udp": "quic", "tcp": "wss"}


@dataclass(frozen=True, slots=True)
class RelayUrl:
    """One relay of ``RELAY_URL``, parsed."""

    scheme: str
    host: str
    port: int
    path: str


def _with_port(url: str) -> str:
    """``url`` as a suggested fix: with the relay's default port when it names none (the agent
    requires one)."""
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.port is not None:
            return url
    except ValueError:  # a bad port: the check after this one names it
        return url
    return parts._replace(netloc=f"{parts.netloc}:{RELAY_DEFAULT_PORT}").geturl()


def parse_relay_url(url: str) -> RelayUrl:
    """``wss|quic|auto://host:port[/path]`` parsed; ``ValueError`` whose message names the
    fix otherwise. The one parser of ``RELAY_URL`` (config, dialler and ``tunnel-agent check``
    give the same message for the same mistake)."""
    example = f"auto://relay.example.com:{RELAY_DEFAULT_PORT}"
    if "://" not in url:
        raise ValueError(f"RELAY_URL {url!r} has no scheme: write {_with_port('auto://' + url)} "
                         "(or wss:// or quic://)")
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        raise ValueError(f"RELAY_URL {url!r} is not a URL: write e.g. {example}") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        hint = _SCHEME_HINTS.get(scheme)
        fix = (f"write {_with_port(hint + '://' + url.split('://', 1)[1])}" if hint
               else f"use wss://, quic:// or auto://, e.g. {example}")
        raise ValueError(f"RELAY_URL {url!r}: the agent speaks wss:// (TLS WebSocket), quic:// or auto:// "
                         f"(WSS, else QUIC), not {scheme}://; {fix}")
    if not parts.hostname:
        raise ValueError(f"RELAY_URL {url!r} has no host: write e.g. {example}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"RELAY_URL {url!r} has a bad port: write e.g. {example}") from None
    if port is None:
        raise ValueError(f"RELAY_URL {url!r} has no port: write {scheme}://{parts.netloc}:{RELAY_DEFAULT_PORT} "
                         f"(the relay's default agent port) or the port its operator gave you")
    return RelayUrl(scheme, parts.hostname, port, parts.path or "")


class Dialer:
    """Dials the relay named by ``url``; one instance per agent, reused across reconnects.

    ``now`` arguments and the probe clock are ``time.monotonic()`` seconds (the same clock
    as asyncio's and uvloop's ``loop.time()``).
    """

    def __init__(self, url: str, *, ca_file: str | None, limits: Limits,
                 proxy_env: Mapping[str, str] = os.environ, quic_engine: str = "aioquic") -> None:
        parsed = parse_relay_url(url)
        scheme = parsed.scheme
        self.url = url
        self.scheme = scheme
        self.host = parsed.host
        self.port = parsed.port
        self.path = parsed.path
        self.ca_file = ca_file
        self.limits = limits
        self.environ = proxy_env
        #: The QUIC engine of QUIC links (tunnel.quic_engine; AgentSettings.quic_engine).
        self.quic_engine = quic_engine
        self.probe_timeout = limits.quic_probe_timeout
        self.reprobe_interval = limits.quic_reprobe_interval
        #: The limits of QUIC links: under ``auto``, the shorter liveness bound.
        self.quic_limits = limits
        if scheme == "auto" and limits.auto_quic_keepalive_timeout < limits.keepalive_timeout:
            bound = limits.auto_quic_keepalive_timeout
            self.quic_limits = limits.replace(keepalive_timeout=bound,
                                              keepalive_interval=min(limits.keepalive_interval, bound / 4))
        #: Carrier of the last link :meth:`dial`, :meth:`probe_wss` or :meth:`probe_quic` returned.
        self.carrier: str | None = None
        #: Why the last QUIC attempt failed (for logs; never holds secrets).
        self.last_quic_error: str | None = None
        #: Why the last WSS attempt under ``auto`` failed (for logs; never holds secrets).
        self.last_wss_error: str | None = None
        self._wss_failure: LinkError | None = None
        self._last_probe: float | None = None
        #: Returns ``(certificate file, key file)`` for WSS links to present when the relay
        #: asks for a client certificate (mutual TLS), or None; read at each dial.
        self.client_certificate: Callable[[], tuple[str, str] | None] | None = None

    # --- public ----------------------------------------------------------------------

    async def dial(self) -> Link:
        """A ready link (HELLOs exchanged), or ``LinkError`` (under ``auto``, when both
        carriers failed, one naming both and caused by WSS's: the diagnosis is WSS's)."""
        if self.scheme == "quic":
            link = await self._quic(self.limits.handshake_timeout)
        elif self.scheme == "wss":
            link = await self._wss()
        else:
            link = await self.probe_wss()
            if link is None:
                link = await self.probe_quic(timeout=self.probe_timeout)
                if link is None:
                    raise LinkError(f"{self.last_wss_error} (QUIC too: {self.last_quic_error})") from self._wss_failure
                log.info("WSS to %s:%d failed (%s): riding QUIC; WSS again every %g s", self.host, self.port,
                         self.last_wss_error, self.reprobe_interval)
        self.carrier = link.carrier
        return link

    def next_probe_in(self, now: float | None = None) -> float | None:
        """Seconds until WSS is worth trying again (0: now); None unless ``auto`` rides QUIC."""
        if not self.may_move_to_wss:
            return None
        if self._last_probe is None:
            return 0.0
        now = time.monotonic() if now is None else now
        return max(0.0, self._last_probe + self.reprobe_interval - now)

    @property
    def may_move_to_wss(self) -> bool:
        """True under ``auto`` while riding QUIC (WSS failed): WSS is tried again now and then."""
        return self.scheme == "auto" and self.carrier == "quic"

    async def probe_wss(self) -> Link | None:
        """Under ``auto``: try WSS once; a ready link, or None when it fails (the reason in
        :attr:`last_wss_error`)."""
        self._last_probe = time.monotonic()
        try:
            link = await self._wss()
        except LinkError as exc:
            self.last_wss_error, self._wss_failure = str(exc), exc
            return None
        self.last_wss_error = self._wss_failure = None
        self.carrier = "wss"
        return link

    async def probe_quic(self, timeout: float | None = None) -> Link | None:
        """Try QUIC once (probe timeout); a ready link, or None when it fails."""
        self._last_probe = time.monotonic()
        log.debug("trying QUIC to %s:%d (timeout %g s)", self.host, self.port,
                  self.probe_timeout if timeout is None else timeout)
        try:
            link = await self._quic(self.probe_timeout if timeout is None else timeout)
        except LinkError as exc:
            self.last_quic_error = str(exc)
            return None
        self.last_quic_error = None
        self.carrier = "quic"
        return link

    # --- carriers --------------------------------------------------------------------

    async def _quic(self, timeout: float) -> Link:
        from tunnel.carriers.quic.client import connect_quic

        return await connect_quic(self.host, self.port, ca_file=self.ca_file, server_name=self.host,
                                  limits=self.quic_limits, timeout=timeout, engine=self.quic_engine)

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca_file)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        files = self.client_certificate() if self.client_certificate is not None else None
        if files is not None:
            context.load_cert_chain(*files)
        return context

    def wss_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"wss://{host}:{self.port}{self.path if self.scheme == 'wss' else ''}"

    async def _wss(self) -> Link:
        from tunnel.carriers.proxy import proxy_for
        from tunnel.carriers.wss import connect_wss

        proxy = proxy_for(self.host, self.port, self.environ)
        try:
            context = self.ssl_context()
        except (OSError, ssl.SSLError) as exc:
            raise LinkError(f"cannot load the relay CA file or the agent's certificate: {exc}") from None
        return await connect_wss(self.wss_url(), ssl_context=context, limits=self.limits, proxy=proxy,
                                 timeout=self.limits.handshake_timeout)


async def dial_tls_link(address: str, *, ssl_context: ssl.SSLContext, limits: Limits, timeout: float) -> Link:
    """A ready TLS WebSocket link to ``host:port`` with ``ssl_context`` (which may present a
    client certificate): the links between relays. ``LinkError`` when it fails."""
    from tunnel.carriers.wss import connect_wss

    return await connect_wss(f"wss://{address}", ssl_context=ssl_context, limits=limits, timeout=timeout)
