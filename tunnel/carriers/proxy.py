"""Outbound corporate proxy support for the agent: ``HTTPS_PROXY`` + ``NO_PROXY``, HTTP CONNECT.

- :func:`proxy_for` picks the proxy for a relay ``host:port`` from the environment
  (``https_proxy``/``HTTPS_PROXY``, ``http://[user:pass@]host:port``) unless ``no_proxy`` /
  ``NO_PROXY`` exempts it. NO_PROXY entries (comma or space separated, case-insensitive):
  ``*`` (everything), a host name (that host and its subdomains, written with or without a
  leading dot or ``*.``), ``host:port`` (that port only), an IP address, or a CIDR block
  (``10.0.0.0/8``, ``fd00::/8``) matched against literal IP hosts.
- :func:`open_connect_tunnel` connects to the proxy, sends ``CONNECT host:port`` (with
  ``Proxy-Authorization: Basic`` when the URL carries credentials) and returns the connected
  socket once the proxy answers 2xx; the caller then runs TLS over it.

Credentials never appear in logs or exception messages: see :func:`redact`.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import os
import socket
import urllib.parse
from collections.abc import Mapping

from tunnel.wire.errors import LinkError

__all__ = ["proxy_for", "no_proxy_matches", "open_connect_tunnel", "redact"]

log = logging.getLogger("tunnel.carriers.proxy")

#: Largest CONNECT response head we read from a proxy.
MAX_RESPONSE_HEAD = 16 * 1024


def redact(proxy_url: str) -> str:
    """``proxy_url`` without its credentials, for logs and errors."""
    try:
        parts = urllib.parse.urlsplit(proxy_url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = host + (f":{parts.port}" if parts.port else "")
        return urllib.parse.urlunsplit((parts.scheme, netloc, "", "", ""))
    except ValueError:
        return "<unparsable proxy URL>"


def _env(environ: Mapping[str, str], name: str) -> str:
    value = environ.get(name.lower())
    if value is None:
        value = environ.get(name.upper())
    return (value or "").strip()


def _split_host_port(entry: str) -> tuple[str, int | None]:
    """Split ``host``, ``host:port``, ``[v6]``, ``[v6]:port`` or a bare IPv6 address."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        return host, int(port) if port.isdigit() else None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        return host, int(port) if port.isdigit() else None
    return entry, None  # a name, or a bare IPv6 address / CIDR


def _ip(value: str):
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


def no_proxy_matches(no_proxy: str, host: str, port: int) -> bool:
    """True when the NO_PROXY value exempts ``host:port`` from the proxy."""
    host = host.strip().strip("[]").lower().rstrip(".")
    host_ip = _ip(host)
    for raw in no_proxy.replace(" ", ",").split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        if "/" in entry:
            if host_ip is None:
                continue
            try:
                if host_ip in ipaddress.ip_network(entry.strip("[]"), strict=False):
                    return True
            except ValueError:
                pass
            continue
        name, entry_port = _split_host_port(entry)
        if entry_port is not None and entry_port != port:
            continue
        name = name.rstrip(".")
        entry_ip = _ip(name)
        if entry_ip is not None or host_ip is not None:
            if entry_ip is not None and host_ip is not None and entry_ip == host_ip:
                return True
            continue
        if name.startswith("*."):
            name = name[2:]
        elif name.startswith("."):
            name = name[1:]
        if not name:
            continue
        if host == name or host.endswith("." + name):
            return True
    return False


def proxy_for(url_host: str, url_port: int, environ: Mapping[str, str] = os.environ) -> str | None:
    """The proxy URL to reach ``url_host:url_port`` through, or None to dial directly."""
    proxy = _env(environ, "https_proxy")
    if not proxy:
        return None
    if no_proxy_matches(_env(environ, "no_proxy"), url_host, url_port):
        return None
    if "://" not in proxy:
        proxy = "http://" + proxy
    return proxy


def _connect_request(proxy_url: str, host: str, port: int) -> bytes:
    parts = urllib.parse.urlsplit(proxy_url)
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}", "User-Agent: tunnel-agent"]
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode("utf-8")).decode("ascii")
        lines.append(f"Proxy-Authorization: Basic {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


async def open_connect_tunnel(proxy_url: str, host: str, port: int, timeout: float | None) -> socket.socket:
    """A non-blocking socket connected through the proxy to ``host:port`` (CONNECT done).

    Raises :class:`LinkError` (with the proxy URL redacted) on any failure.
    """
    shown = redact(proxy_url)
    try:
        parts = urllib.parse.urlsplit(proxy_url if "://" in proxy_url else "http://" + proxy_url)
        proxy_host = parts.hostname
        proxy_port = parts.port or 80
    except ValueError:
        raise LinkError(f"invalid proxy URL {shown}") from None
    if parts.scheme.lower() != "http" or not proxy_host:
        raise LinkError(f"unsupported proxy URL {shown} (only http:// CONNECT proxies)")
    loop = asyncio.get_running_loop()
    sock: socket.socket | None = None
    try:
        async with asyncio.timeout(timeout):
            sock = await dial_tcp(loop, proxy_host, proxy_port)
            await loop.sock_sendall(sock, _connect_request(proxy_url, host, port))
            head = bytearray()
            while True:
                chunk = await loop.sock_recv(sock, 4096)
                if not chunk:
                    raise LinkError(f"proxy {shown} closed the connection during CONNECT")
                head += chunk
                end = head.find(b"\r\n\r\n")
                if end >= 0:
                    break
                if len(head) > MAX_RESPONSE_HEAD:
                    raise LinkError(f"proxy {shown} sent an oversized CONNECT response")
            status_line = bytes(head[:head.find(b"\r\n")]).decode("latin-1")
            fields = status_line.split(" ", 2)
            if len(fields) < 2 or not fields[0].startswith("HTTP/1.") or not fields[1].isdigit():
                raise LinkError(f"proxy {shown} sent a malformed response {status_line[:80]!r}")
            status = int(fields[1])
            if status == 407:
                raise LinkError(f"proxy {shown} requires authentication (407)")
            if not 200 <= status < 300:
                raise LinkError(f"proxy {shown} refused CONNECT to {host}:{port}: {status_line[:120]}")
            if end + 4 != len(head):
                # The server side of a TLS connection never speaks first. (A refusal may carry a
                # body: the status is read first.)
                raise LinkError(f"proxy {shown} sent data after its CONNECT response")
    except LinkError:
        if sock is not None:
            sock.close()
        raise
    except (OSError, TimeoutError) as exc:
        if sock is not None:
            sock.close()
        what = "timed out" if isinstance(exc, TimeoutError) else str(exc)
        raise LinkError(f"proxy {shown}: {what}") from None
    except BaseException:
        if sock is not None:
            sock.close()
        raise
    log.debug("CONNECT %s:%d through %s done", host, port, shown)
    return sock


async def dial_tcp(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
    """A connected non-blocking TCP socket (TCP_NODELAY) to the first address of ``host``
    that answers; the last error if none does."""
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    last: Exception | None = None
    for family, kind, proto, _, addr in infos:
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, addr)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
        except BaseException:
            sock.close()
            raise
    raise last or OSError(f"no address for {host}")
