"""Messages that name the fix: what the agent (and ``tunnel-agent check``) says when the relay
cannot be reached or trusted, refuses the token, or a private service cannot be reached.

Each function turns one failure into one line for a customer's IT staff: what went wrong and
what to change, in the names they configured (``RELAY_URL``, ``RELAY_CA_FILE``, ``APP_HOST``,
``APP_PORT`` or the file's ``[[resources]]``). Nothing here prints a secret.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import socket
import ssl

from .config import RELAY_DEFAULT_PORT

NEW_JWT = "get a new one from the relay's operator: tunnel-relay resources registration-jwt --customer-id {customer}"
CA_HINT = ("the relay's own CA is <state-dir>/ca.pem on the relay host (./relay-state/ca.pem by default): "
           "copy it here and point RELAY_CA_FILE at it")


# --------------------------------------------------------------------------- the relay


def relay_failure(exc: BaseException, *, host: str, port: int, ca_file: str | None,
                  ca_setting: str = "RELAY_CA_FILE") -> str:
    """One line on why the relay at ``host:port`` could not be reached, and the fix;
    ``ca_setting`` names where ``ca_file`` was set (RELAY_CA_FILE, or ca_file in a config file)."""
    root = exc
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    text = describe(root)
    lowered = (str(exc) + " " + text).lower()
    where = f"{host}:{port}"
    if "certificate verify failed" in lowered or "certificate_verify_failed" in lowered:
        if "hostname mismatch" in lowered or "ip address mismatch" in lowered:
            return (f"the relay's certificate does not name {host} ({text}): use a name the certificate "
                    "holds in RELAY_URL, or have the operator add this one (tunnel-relay serve --server-name)")
        if "expired" in lowered:
            return f"the relay's certificate expired ({text}): ask the relay's operator to renew it"
        if ca_file:
            return (f"the relay's certificate is not trusted by {ca_setting} {ca_file} ({text}): it is the wrong "
                    f"file; {CA_HINT}")
        return (f"the relay's certificate is not trusted by this system's store ({text}): RELAY_CA_FILE is not "
                f"set; {CA_HINT}")
    if isinstance(root, ConnectionRefusedError) or "connection refused" in lowered:
        return (f"nothing listens on {where} (connection refused): is the relay running? RELAY_URL must name its "
                f"agent port (tunnel-relay serve --listen, default {RELAY_DEFAULT_PORT})")
    if isinstance(root, socket.gaierror) or "name or service not known" in lowered \
            or "temporary failure in name resolution" in lowered or "cannot resolve" in lowered:
        return f"{host} does not resolve ({text}): fix the host in RELAY_URL, or this host's DNS"
    if "timed out" in lowered:
        return (f"no answer from {where} ({text}): a firewall may drop the traffic (outbound TCP for wss://, "
                "UDP for quic://), or the relay is down")
    return f"{where}: {str(exc) or text}"


# --------------------------------------------------------------------------- the token


def jwt_claims(token: str) -> dict:
    """The JWT's payload, decoded without verifying it (the relay verifies); ValueError if malformed."""
    parts = token.split(".")
    if len(parts) != 3 or not all(parts[:2]):
        raise ValueError(f"expected three dot-separated parts, found {len(parts)}")
    try:
        header = json.loads(_b64url(parts[0]))
        payload = json.loads(_b64url(parts[1]))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ValueError("its parts are not base64url-encoded JSON") from None
    if not isinstance(header, dict) or not isinstance(payload, dict):
        raise ValueError("its header and payload must be JSON objects")
    if header.get("alg") != "EdDSA":
        raise ValueError(f"algorithm {str(header.get('alg'))[:20]!r}, not the relay's EdDSA")
    return payload


def token_customer(token: str) -> str:
    """The customer a token names, or ``ID`` when it cannot be read."""
    try:
        return str(jwt_claims(token).get("sub") or "ID")[:64]
    except ValueError:
        return "ID"


def auth_fix(message: str, customer: str) -> str:
    """The fix for a registration the relay refused with ``message``."""
    new = NEW_JWT.format(customer=customer)
    if "signature invalid" in message or "malformed" in message:
        return ("this JWT was issued by another relay (or this relay's state was reset): " + new +
                " on the relay RELAY_URL names")
    if "certificate_required" in message:
        return ("this relay requires agent certificates: give the agent a state directory (AGENT_STATE_DIR) "
                "so that it enrols with its JWT")
    if "expired" in message or "revoked" in message:
        return new
    if "customer does not exist" in message:
        return "the customer was deleted or belongs to another relay: " + new
    if "another resource name" in message or "resource does not exist" in message:
        return "the JWT is for one resource: set NAME to that resource's name, or " + new
    if "not yet valid" in message or "future" in message:
        return "set this host's clock right (NTP)"
    return new


def _b64url(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


# --------------------------------------------------------------------------- private services

#: Why a private service could not be reached, as the agent reports it to the relay.
DNS, REFUSED, TIMEOUT, UNREACHABLE, ERROR = "dns", "refused", "timeout", "unreachable", "error"


def target_failure(target, exc: BaseException, timeout: float) -> tuple[str, str, str]:
    """``(reason, detail, fix)`` for a failed connection to ``target`` (agent.config.Target).

    ``reason`` is one of the constants above; ``detail`` names the address (it stays in the
    agent's own log and output); ``fix`` names the setting to change."""
    where = target.address
    if isinstance(exc, socket.gaierror):
        return (DNS, f"{target.host} does not resolve from here ({describe(exc)})",
                f"fix {target.host_setting}, or this host's DNS (/etc/resolv.conf, /etc/hosts): the agent dials "
                "it from here")
    if isinstance(exc, ConnectionRefusedError) or _all_refused(exc):
        return (REFUSED, f"nothing listens on {where} (connection refused)",
                f"start the service, or fix {target.port_setting} (and {target.host_setting})")
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return (TIMEOUT, f"no answer from {where} within {timeout:g} s",
                f"a firewall drops it: let this host reach {where}, or fix {target.host_setting}")
    if isinstance(exc, OSError) and exc.errno in (101, 113):  # ENETUNREACH, EHOSTUNREACH
        return (UNREACHABLE, f"cannot connect to {where}: {describe(exc)}",
                f"let this host reach {where} (routing, firewall), or fix {target.host_setting}")
    return (ERROR, f"cannot connect to {where}: {describe(exc)}",
            f"let this host reach {where}, or fix {target.host_setting}")


#: What the relay is told (no address: the private network's layout is the customer's).
REASON_TEXT = {
    DNS: "the configured host does not resolve at the agent",
    REFUSED: "connection refused: nothing listens on the configured port",
    TIMEOUT: "no answer from the configured address (a firewall drops it?)",
    UNREACHABLE: "the configured address is unreachable from the agent",
    ERROR: "the agent cannot connect to the configured address",
}


# --------------------------------------------------------------------------- helpers


def _all_refused(exc: BaseException) -> bool:
    """asyncio's "Multiple exceptions" OSError when every address of a name refused."""
    text = str(exc)
    return (isinstance(exc, OSError) and exc.errno is None and text.startswith("Multiple exceptions")
            and text.count("[Errno 111]") == text.count("[Errno "))


def describe(exc: BaseException | None) -> str:
    """An exception as a short phrase (asyncio's "Connect call failed (...)" hides the reason)."""
    if exc is None:
        return "failed"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return "timed out"
    if isinstance(exc, socket.gaierror):
        return exc.strerror or str(exc)
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
