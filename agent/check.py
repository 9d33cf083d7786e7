"""``tunnel-agent check``: a preflight of everything the agent needs, one line per check.

::

    tunnel-agent check [--config FILE] [--output text|json] [--timeout SECONDS]

Checks, in order (a check that cannot run because an earlier one failed is ``skip``):

=================  ==========================================================================
``config``         the environment (or ``--config`` file) is a valid agent configuration
``runtime``        version, Python, event loop (uvloop or asyncio), frame codec, TLS and QUIC engines in use
``relay-dns``      the relay's host name resolves
``proxy``          ``HTTPS_PROXY`` is reachable and allows ``CONNECT`` to the relay
``relay-tcp``      a TCP connection to the relay (through the proxy when there is one)
``relay-tls``      the TLS handshake, and the relay's certificate trusted (if not: why not)
``relay-quic``     a QUIC link (``quic://``: required; ``auto://``, whose fallback it is: a warning when blocked)
``jwt``            the registration JWT is well formed and within its validity
``jwt-accepted``   the relay accepts it: a real, check-only registration (``dry_run``)
``target NAME``    each resource's ``host:port`` resolves and accepts a TCP connection
=================  ==========================================================================

Status is ``pass``, ``warn``, ``fail`` or ``skip``; every ``warn`` and ``fail`` names its fix.
The exit code is 1 when any check failed, else 0. ``--output json`` prints one document:
``{"ok": bool, "version": "...", "checks": [{"name", "status", "detail", "fix"}]}``.
The check-only registration leaves the relay as it was: no agent joins, no resource is
created, and agents already serving are not touched. Secrets are never printed.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass

from tunnel import __version__

from .hints import CA_HINT, NEW_JWT, auth_fix, target_failure
from .identity import CERT_FILE
from .hints import describe as _why
from .hints import jwt_claims as _jwt_claims

PASS, WARN, FAIL, SKIP = "pass", "warn", "fail", "skip"
DEFAULT_TIMEOUT = 5.0
#: A token expiring sooner than this is a warning.
EXPIRY_WARNING_DAYS = 14


@dataclass
class Check:
    """One line of the report."""

    name: str
    status: str
    detail: str
    fix: str = ""


class Report:
    def __init__(self) -> None:
        self.checks: list[Check] = []

    def add(self, name: str, status: str, detail: str, fix: str = "") -> Check:
        check = Check(name, status, detail, fix)
        self.checks.append(check)
        return check

    def status(self, name: str) -> str | None:
        return next((c.status for c in self.checks if c.name == name), None)

    @property
    def ok(self) -> bool:
        return all(c.status != FAIL for c in self.checks)

    def text(self) -> str:
        width = max(len(c.name) for c in self.checks)
        lines = []
        for c in self.checks:
            line = f"{c.status.upper():4}  {c.name:<{width}}  {c.detail}"
            if c.fix:
                line += f"  -> fix: {c.fix}"
            lines.append(line)
        return "\n".join(lines)

    def json(self) -> str:
        return json.dumps({"ok": self.ok, "version": __version__, "checks": [asdict(c) for c in self.checks]},
                          indent=2)


# --------------------------------------------------------------------------- the checks


class Preflight:
    """Runs the checks for one configuration (``environ``: the agent's environment)."""

    def __init__(self, environ, config_file: str | None, timeout: float) -> None:
        self.environ = environ
        self.config_file = config_file
        self.timeout = timeout
        self.report = Report()
        self.conf = None
        self.limits = None
        self.dialer = None
        self.quic_engine = "aioquic"
        self.claims: dict | None = None

    async def run(self) -> Report:
        if not self.check_config():
            for name in ("relay-dns", "proxy", "relay-tcp", "relay-tls", "relay-quic", "jwt", "jwt-accepted"):
                self.report.add(name, SKIP, "configuration invalid")
            return self.report
        resolved = await self.check_dns()
        reachable = await self.check_proxy_and_tcp(resolved)
        await self.check_tls(reachable)
        quic_link = await self.check_quic(resolved)
        self.check_jwt()
        await self.check_registration(quic_link, reachable)
        await asyncio.gather(*(self.check_target(t) for t in self.conf.targets))
        return self.report

    # --- configuration

    def check_config(self) -> bool:
        from tunnel.bridge.dial import Dialer
        from tunnel.core.limits import Limits

        from . import config as agent_config
        from .settings import AgentSettings

        try:
            conf = agent_config.load(self.environ, self.config_file)
            limits = Limits.from_env(self.environ)
            self.quic_engine = AgentSettings.from_env(self.environ).quic_engine
            dialer = Dialer(conf.relay_url, ca_file=conf.ca_file, limits=limits, proxy_env=self.environ,
                            quic_engine=self.quic_engine)
        except (agent_config.ConfigError, ValueError) as exc:
            self.report.add("config", FAIL, str(exc), "set the variables as the message says "
                            "('tunnel-agent --help' lists them; README: the agent's config file)")
            return False
        self.conf, self.limits, self.dialer = conf, limits, dialer
        source = f"config file {self.config_file}" if self.config_file else "environment"
        targets = ", ".join(f"{t.name} -> {t.host}:{t.port}" for t in conf.targets)
        self.report.add("config", PASS, f"{source}: relay {dialer.scheme}://{_host_port(dialer.host, dialer.port)}"
                        f"; resources {targets}; token from {conf.token_source}; "
                        f"trust {(conf.ca_setting + ' ' + conf.ca_file) if conf.ca_file else 'the system store'}")
        self.check_runtime()
        return True

    def check_runtime(self) -> None:
        from tunnel import codec
        from tunnel.bridge.probe import tls_engine
        from tunnel.core import session

        try:
            import uvloop
            loop = f"uvloop {uvloop.__version__}"
        except ImportError:
            loop = "asyncio (uvloop is not installed)"
        build = "single-file build" if getattr(sys, "frozen", False) else sys.executable
        self.report.add("runtime", PASS, f"tunnel-agent {__version__}, Python {sys.version.split()[0]} ({build}), "
                        f"{loop}, {codec.IMPLEMENTATION} frame codec, TLS engine {tls_engine()}, "
                        f"QUIC engine {self.quic_engine}, "
                        f"{'pure-Python' if session.__file__.endswith('.py') else 'compiled'} per-message path")

    # --- the way to the relay

    async def check_dns(self) -> bool:
        from tunnel.bridge.probe import relay_proxy

        host, port = self.dialer.host, self.dialer.port
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout):
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, TimeoutError) as exc:
            if relay_proxy(self.dialer):  # WSS goes through the proxy, which resolves the name
                if self.dialer.scheme == "wss":
                    self.report.add("relay-dns", PASS, f"{host} does not resolve here ({_why(exc)}); "
                                    "the proxy resolves it for WSS")
                else:
                    self.report.add("relay-dns", WARN, f"{host} does not resolve here ({_why(exc)}): QUIC cannot "
                                    "reach it; WSS goes through the proxy, which resolves it",
                                    "make the relay's name resolvable on this host for QUIC, or use wss://")
                return True
            self.report.add("relay-dns", FAIL, f"{host} does not resolve: {_why(exc)}",
                            "fix the host in RELAY_URL, or this host's DNS resolver (/etc/resolv.conf)")
            return False
        addresses = sorted({info[4][0] for info in infos})
        self.report.add("relay-dns", PASS, f"{host} -> {', '.join(addresses[:4])}")
        return True

    async def check_proxy_and_tcp(self, resolved: bool) -> bool:
        from tunnel.bridge.probe import proxy_connect, relay_proxy, tcp_connect

        target = _host_port(self.dialer.host, self.dialer.port)
        proxy = relay_proxy(self.dialer)
        if proxy is None:
            why = ("quic:// does not use it" if self.dialer.scheme == "quic"
                   else "NO_PROXY exempts the relay" if _proxy_set(self.environ) else "HTTPS_PROXY not set")
            self.report.add("proxy", PASS, f"not used ({why})")
        else:
            outcome = await proxy_connect(proxy, self.dialer.host, self.dialer.port, self.timeout)
            if not outcome.reachable:
                self.report.add("proxy", FAIL, f"proxy {outcome.proxy} unreachable: {outcome.error}",
                                "fix the host and port in HTTPS_PROXY, or start the proxy; "
                                "NO_PROXY exempts the relay if it is reachable directly")
                self.report.add("relay-tcp", SKIP, "the proxy is unreachable")
                return False
            if not outcome.allowed:
                if outcome.status == 407:
                    fix = "put the proxy's credentials in HTTPS_PROXY: http://USER:PASSWORD@proxy:port"
                elif outcome.status is not None and outcome.status >= 500:
                    fix = f"the proxy cannot reach the relay at {target}: check that the relay runs and the address"
                else:
                    fix = (f"ask the proxy's administrators to allow CONNECT to {target} (port {self.dialer.port}), "
                           "or exempt the relay with NO_PROXY if it is reachable directly")
                self.report.add("proxy", FAIL, f"{outcome.error}", fix)
                self.report.add("relay-tcp", SKIP, "the proxy did not connect")
                return False
            self.report.add("proxy", PASS, f"{outcome.proxy} allows CONNECT to {target}")
        if not resolved:
            self.report.add("relay-tcp", SKIP, "the relay's name does not resolve")
            return False
        try:
            sock = await tcp_connect(self.dialer, self.timeout)
        except Exception as exc:  # noqa: BLE001 - OSError, TimeoutError, LinkError: all a failure to report
            status = FAIL if self.dialer.scheme == "wss" else WARN
            fix = (f"start the relay, or fix the port in RELAY_URL; a firewall must let this host reach {target} over TCP"
                   if isinstance(exc, ConnectionRefusedError) else
                   f"a firewall must let this host reach {target} over TCP (outbound); check the relay runs")
            if self.dialer.scheme == "quic":
                fix = "quic:// uses UDP only; TCP matters for wss:// and auto:// (" + fix + ")"
            elif self.dialer.scheme == "auto":
                fix = "auto:// rides QUIC while TCP is blocked, if relay-quic passes (" + fix + ")"
            self.report.add("relay-tcp", status, f"cannot connect to {target}: {_why(exc)}", fix)
            return False
        sock.close()
        self.report.add("relay-tcp", PASS, f"connected to {target}" + (" through the proxy" if proxy else ""))
        return True

    async def check_tls(self, reachable: bool) -> None:
        from tunnel.bridge.probe import (
            CERT_EXPIRED,
            CERT_NOT_YET_VALID,
            HOSTNAME_MISMATCH,
            IP_MISMATCH,
            read_ca_file,
            tls_handshake,
        )

        if not reachable:
            self.report.add("relay-tls", SKIP, "no TCP connection to the relay")
            return
        try:
            outcome = await tls_handshake(self.dialer, self.timeout)
        except Exception as exc:  # noqa: BLE001 - the connection itself failed this time
            self.report.add("relay-tls", FAIL, f"connection failed: {_why(exc)}", "run the check again; "
                            "if it persists, something between here and the relay breaks TLS connections")
            return
        cert = outcome.cert
        if outcome.trusted:
            days = (cert.not_after - _now()).days if cert else 0
            detail = f"{outcome.version}, certificate for {', '.join(cert.names[:4]) or cert.subject} issued by " \
                     f"{cert.issuer!r}, valid until {cert.not_after:%Y-%m-%d}" if cert else outcome.version
            if cert and days < EXPIRY_WARNING_DAYS:
                self.report.add("relay-tls", WARN, detail + f" (expires in {days} days)",
                                "ask the relay's operator to renew its certificate")
            else:
                self.report.add("relay-tls", PASS, detail)
            return
        if outcome.error:
            self.report.add("relay-tls", FAIL, outcome.error,
                            "RELAY_URL must name the relay's agent port (tunnel-relay serve --listen), "
                            "and nothing on the way may intercept TLS")
            return
        ca_file = self.conf.ca_file
        code = outcome.verify_code
        issuer = f"{cert.issuer!r}" if cert else "an unknown issuer"
        if code == CERT_EXPIRED:
            when = f" on {cert.not_after:%Y-%m-%d}" if cert else ""
            self.report.add("relay-tls", FAIL, f"the relay's certificate expired{when}",
                            "ask the relay's operator to renew it (the relay renews its own certificate on "
                            "restart; a --cert file must be replaced)")
        elif code == CERT_NOT_YET_VALID:
            self.report.add("relay-tls", FAIL, "the relay's certificate is not valid yet",
                            "set this host's clock right (NTP)")
        elif code in (HOSTNAME_MISMATCH, IP_MISMATCH):
            names = ", ".join(cert.names) if cert else "other names"
            self.report.add("relay-tls", FAIL, f"the relay's certificate is for {names}, not {self.dialer.host}",
                            f"use one of those names in RELAY_URL, or have the operator add {self.dialer.host} "
                            "(tunnel-relay serve --server-name NAME)")
        elif ca_file:
            setting = self.conf.ca_setting
            try:
                held = read_ca_file(ca_file)
            except (OSError, ValueError):
                held = []
                anchors = "unreadable certificates"
            else:
                anchors = ", ".join(repr(name) for name, _ in held) or "no certificate"
            if cert and any(name == cert.issuer for name, _ in held):
                # The same name, another CA (one host's relays, or a relay whose state was reset):
                # the key identifiers tell them apart.
                keys = ", ".join(key_id or "none" for name, key_id in held if name == cert.issuer)
                issuer = f"{issuer} (key id {cert.issuer_key_id or 'unknown'})"
                anchors = f"another CA of the same name (key id {keys})"
            self.report.add("relay-tls", FAIL,
                            f"certificate not trusted: issued by {issuer}, but {setting} {ca_file} holds "
                            f"{anchors} ({outcome.verify_message})",
                            f"{setting} is the wrong file: {CA_HINT.replace('RELAY_CA_FILE', setting.split()[0])}")
        else:
            self.report.add("relay-tls", FAIL,
                            f"certificate not trusted: issued by {issuer}, which the system store does not "
                            f"trust ({outcome.verify_message})",
                            f"RELAY_CA_FILE is not set: {CA_HINT}")

    async def check_quic(self, resolved: bool):
        from tunnel.bridge.dial import Dialer

        scheme = self.dialer.scheme
        target = _host_port(self.dialer.host, self.dialer.port)
        if scheme == "wss":
            self.report.add("relay-quic", SKIP, "RELAY_URL is wss://: QUIC not used")
            return None
        if not resolved:
            self.report.add("relay-quic", SKIP, "the relay's name does not resolve")
            return None
        quic = Dialer(f"quic://{target}", ca_file=self.conf.ca_file, limits=self.limits, proxy_env=self.environ,
                      quic_engine=self.quic_engine)
        link = await quic.probe_quic(timeout=self.timeout)
        if link is not None:
            self.report.add("relay-quic", PASS, f"QUIC link to {target} (UDP) up"
                            + ("; auto:// rides WSS and falls back to it" if scheme == "auto" else ""))
            return link
        error = quic.last_quic_error or "failed"
        if "certificate" in error.lower():
            self.report.add("relay-quic", FAIL, f"QUIC: {error}", "the relay's certificate is not trusted: "
                            "see relay-tls (the same certificate serves TCP and UDP)")
        elif scheme == "auto":
            self.report.add("relay-quic", WARN, f"QUIC (UDP {self.dialer.port}) blocked or unanswered: {error}; "
                            "auto:// rides WSS and has no fallback when TCP fails",
                            f"allow outbound UDP to {target} so that auto:// can fall back to QUIC")
        else:
            self.report.add("relay-quic", FAIL, f"QUIC (UDP {self.dialer.port}) blocked or unanswered: {error}",
                            f"allow outbound UDP to {target}, or use RELAY_URL=auto://{target} (WSS over TCP, "
                            "QUIC when TCP is blocked)")
        return None

    # --- the registration token

    def check_jwt(self) -> None:
        if not self.conf.token:  # enrolled: links by the certificate in the state directory
            self.check_certificate()
            return
        try:
            self.claims = _jwt_claims(self.conf.token)
        except ValueError as exc:
            self.report.add("jwt", FAIL, f"the registration JWT is malformed: {exc}",
                            "copy the whole token (three dot-separated parts) printed by "
                            "tunnel-relay resources registration-jwt, without quotes or line breaks")
            return
        claims = self.claims
        customer = claims.get("sub", "?")
        scope = f"resource {claims['rid']}" if claims.get("rid") else "any resource"
        now = time.time()
        exp = claims.get("exp")
        nbf = claims.get("nbf")
        if not isinstance(exp, (int, float)):
            self.report.add("jwt", FAIL, "the registration JWT has no expiry", NEW_JWT.format(customer=customer))
            return
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(exp))
        if exp <= now:
            self.report.add("jwt", FAIL, f"the registration JWT of customer {customer} expired on {when}",
                            NEW_JWT.format(customer=customer))
        elif isinstance(nbf, (int, float)) and nbf > now + 30:
            self.report.add("jwt", FAIL, "the registration JWT is not valid yet "
                            f"(from {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(nbf))})",
                            "set this host's clock right (NTP)")
        elif exp - now < EXPIRY_WARNING_DAYS * 86400:
            self.report.add("jwt", WARN, f"customer {customer}, {scope}, expires on {when}",
                            NEW_JWT.format(customer=customer) + " before then")
        else:
            self.report.add("jwt", PASS, f"customer {customer}, {scope}, valid until {when}")

    def check_certificate(self) -> None:
        """The agent's certificate (agent.identity) when no JWT is set."""
        from cryptography import x509

        path = os.path.join(self.conf.state_dir, CERT_FILE)
        self.report.add("jwt", SKIP, f"no registration JWT: the agent links by its certificate {path}")
        try:
            cert = x509.load_pem_x509_certificates(open(path, "rb").read())[0]
        except (OSError, ValueError, IndexError) as exc:
            self.report.add("certificate", FAIL, f"cannot read the agent certificate {path}: {exc}",
                            "set REGISTRATION_JWT to enrol again")
            return
        end = cert.not_valid_after_utc.timestamp()
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(end))
        if end <= time.time():
            self.report.add("certificate", FAIL, f"the agent certificate expired on {when}",
                            "set REGISTRATION_JWT to enrol again")
        else:
            self.report.add("certificate", PASS, f"{cert.subject.rfc4514_string()}, valid until {when} "
                            "(renewed over the live link)")

    async def check_registration(self, quic_link, reachable: bool) -> None:
        if not self.conf.token:
            self.report.add("jwt-accepted", SKIP, "no registration JWT: the agent links by its certificate")
            if quic_link is not None:
                quic_link.close()
            return
        if self.report.status("jwt") == FAIL and self.claims is None:
            self.report.add("jwt-accepted", SKIP, "the JWT is malformed")
            if quic_link is not None:
                quic_link.close()
            return
        link = quic_link
        if link is not None and self.dialer.scheme == "auto" and reachable and self.report.status("relay-tls") != FAIL:
            link.close()  # auto:// registers over WSS when it can: check the carrier it rides
            link = None
        if link is None:
            if self.dialer.scheme == "quic" or not reachable or self.report.status("relay-tls") == FAIL:
                self.report.add("jwt-accepted", SKIP, "no link to the relay")
                return
            from tunnel.bridge.dial import Dialer

            wss = Dialer(f"wss://{_host_port(self.dialer.host, self.dialer.port)}{self.dialer.path}",
                         ca_file=self.conf.ca_file, limits=self.limits, proxy_env=self.environ)
            try:
                async with asyncio.timeout(self.timeout * 2):
                    link = await wss.dial()
            except Exception as exc:  # noqa: BLE001 - LinkError, OSError, TimeoutError
                self.report.add("jwt-accepted", FAIL, f"WSS link to the relay failed: {_why(exc)}",
                                "RELAY_URL must name the relay's agent port; a proxy on the way must pass "
                                "WebSocket upgrades")
                return
        try:
            answer = await self._dry_run(link)
        finally:
            link.close()
            try:
                await asyncio.wait_for(link.wait_closed(), 2.0)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - already reported what matters
                pass
        customer = (self.claims or {}).get("sub", "ID")
        kind = answer.get("type")
        if kind in ("checked", "registered"):
            parts = []
            for res in answer.get("resources") or []:
                if res.get("id"):
                    parts.append(f"{res.get('name')} ({res.get('id')}, endpoint {res.get('endpoint')})")
                else:
                    parts.append(f"{res.get('name')} (new: created at the first registration)")
            note = "" if kind == "checked" else " (this relay has no check-only registration: registered briefly)"
            self.report.add("jwt-accepted", PASS, f"the relay accepts it over {link.carrier}: "
                            f"{', '.join(parts)}{note}")
            return
        if kind == "error":
            message = str(answer.get("message", ""))[:300]
            self.report.add("jwt-accepted", FAIL, f"the relay refused it: {message} ({answer.get('code')})",
                            auth_fix(message, customer))
            return
        self.report.add("jwt-accepted", FAIL, f"the relay did not answer the registration: {answer.get('reason')}",
                        "run the check again; if it persists, look at the relay's log for this address")

    async def _dry_run(self, link) -> dict:
        from tunnel.carriers.base import LinkHandler
        from tunnel.wire.constants import ErrorCode

        from .runner import Agent

        loop = asyncio.get_running_loop()
        answer: asyncio.Future = loop.create_future()

        class Probe(LinkHandler):
            def stream_opened(self, stream):
                stream.reset(ErrorCode.REFUSED)  # a relay that registered us for real
                return None

            def control_received(self, message: dict) -> None:
                if message.get("type") in ("checked", "registered", "error") and not answer.done():
                    answer.set_result(message)

            def link_closed(self, code: int, reason: str) -> None:
                if not answer.done():
                    answer.set_result({"type": "closed", "reason": reason or f"closed with code {code}"})

        link.set_handler(Probe())
        message = Agent(self.conf, self.limits, dialer=self.dialer)._auth_message()
        message["dry_run"] = True
        link.send_control(message)
        try:
            return await asyncio.wait_for(asyncio.shield(answer), self.timeout)
        except asyncio.TimeoutError:
            return {"type": "closed", "reason": f"no answer within {self.timeout:g} s"}

    # --- the private services

    async def check_target(self, target) -> None:
        name = f"target {target.name}"
        where = target.address
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout):
                infos = await loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
        except (OSError, TimeoutError) as exc:
            _, detail, fix = target_failure(target, exc if isinstance(exc, socket.gaierror) else
                                            socket.gaierror(str(_why(exc))), self.timeout)
            self.report.add(name, FAIL, detail, fix)
            return
        last: BaseException | None = None
        for family, kind, proto, _, addr in infos:
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            try:
                async with asyncio.timeout(self.timeout):
                    await loop.sock_connect(sock, addr)
                self.report.add(name, PASS, f"{where} ({addr[0]}) accepts TCP connections")
                return
            except (OSError, TimeoutError) as exc:
                last = exc
            finally:
                sock.close()
        _, detail, fix = target_failure(target, last, self.timeout)
        self.report.add(name, FAIL, detail, fix)


# --------------------------------------------------------------------------- helpers








def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"




def _proxy_set(environ) -> bool:
    return any(environ.get(k) for k in ("https_proxy", "HTTPS_PROXY"))


def _now():
    import datetime

    return datetime.datetime.now(datetime.timezone.utc)




# --------------------------------------------------------------------------- entry point


def main(argv: list[str]) -> int:
    """``tunnel-agent check ...``; returns the exit code."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="tunnel-agent check",
        description="Check everything the agent needs (configuration, DNS, proxy, TLS trust, QUIC, "
                    "registration JWT, each private service) and name the fix for what fails. "
                    "Reads the same environment variables (or --config file) as the agent.")
    parser.add_argument("--config", help="TOML configuration file (also AGENT_CONFIG_FILE)")
    parser.add_argument("--output", "-o", choices=("text", "json"), default="text",
                        help="text: one line per check (default); json: one JSON document")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help=f"per network check (default {DEFAULT_TIMEOUT:g})")
    args = parser.parse_args(argv)
    if not args.timeout > 0:
        parser.error("--timeout must be positive")
    import logging

    # The report says what failed; the libraries' own warnings (aioquic's) would only repeat it.
    logging.getLogger().addHandler(logging.NullHandler())
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:  # pragma: no cover - asyncio serves as well
        runner = asyncio.run
    report = runner(Preflight(os.environ, args.config, args.timeout).run())
    try:
        print(report.json() if args.output == "json" else report.text(), flush=True)
    except BrokenPipeError:  # piped into e.g. `head`: no traceback
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - Python flushes stdout at exit
    return 0 if report.ok else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
