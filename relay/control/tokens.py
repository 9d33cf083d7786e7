"""Registration JWTs: Ed25519-signed (``alg`` EdDSA, nothing else accepted).

Claims::

    iss  "tunnel-relay"        aud  "tunnel-agent"
    sub  customer id           rid  resource id (optional: then the token serves any name)
    gen  resource generation   org  organisation-only token (sub is then "cus_org")
    iat, nbf, exp              jti  random id (recorded in the state's tokens table)

Revocation is by generation: rotating a resource increments its generation, and tokens
carrying a lower ``gen`` stop working for it (see :func:`check_against_state`).

Every failure raises :class:`tunnel.wire.errors.AuthError` whose message never contains the token.
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from tunnel.wire.errors import AuthError

from relay.state.relay_state import ORG_CUSTOMER_ID, RelayState, allocate_port, ensure_state_dir

ISSUER = "tunnel-relay"
AUDIENCE = "tunnel-agent"
ALGORITHMS = ["EdDSA"]
LEEWAY_SECONDS = 30
MAX_TOKEN_LENGTH = 8 * 1024
DEFAULT_TTL_SECONDS = 365 * 86400
MAX_TTL_SECONDS = 10 * 365 * 86400
SIGNING_KEY_FILE = "signing-key.pem"
REQUIRED_CLAIMS = ["exp", "iat", "iss", "aud", "sub", "jti"]

_ID_RE = re.compile(r"^(cus_[a-z2-7]{16}|cus_org)$")
_RES_RE = re.compile(r"^res_[a-z2-7]{16}$")
_TOKEN_CHARS_RE = re.compile(r"^[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*$")


def token_subject(customer_id: str | None, org_only: bool) -> tuple[str, bool]:
    """The one rule for whom a registration JWT is for, shared by the CLI (through the admin
    API) and the API: an organisation-only token is the token of the organisation's own
    customer ``cus_org``. So ``org_only``, ``customer_id`` ``cus_org``, or both, give an
    organisation-only token; ``org_only`` with another customer is an error, and so is
    neither. Return ``(customer_id, org_only)``; raise ``ValueError`` with the reason."""
    if org_only or customer_id == ORG_CUSTOMER_ID:
        if customer_id not in (None, ORG_CUSTOMER_ID):
            raise ValueError(f"an organisation-only token belongs to {ORG_CUSTOMER_ID}, not to {customer_id}: "
                             f"give either org-only or customer id {ORG_CUSTOMER_ID}")
        return ORG_CUSTOMER_ID, True
    if customer_id is None:
        raise ValueError("a customer id is required (or org-only, for an organisation-only token)")
    return customer_id, False


@dataclasses.dataclass(frozen=True, slots=True)
class Claims:
    customer_id: str
    resource_id: str | None
    generation: int
    org_only: bool
    jti: str
    expires_at: int
    issued_at: int = 0


class TokenAuthority:
    """Issues and verifies registration JWTs with the relay's Ed25519 signing key."""

    def __init__(self, state_dir: str | os.PathLike | None = None, *, private_key: Ed25519PrivateKey | None = None) -> None:
        if private_key is None:
            if state_dir is None:
                raise TypeError("TokenAuthority needs a state_dir or a private_key")
            private_key = _load_or_create_key(Path(state_dir) / SIGNING_KEY_FILE)
        self._private_key = private_key
        self._public_key: Ed25519PublicKey = private_key.public_key()

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._public_key

    # ---- issuing

    def issue_with_claims(
        self,
        customer_id: str | None,
        resource_id: str | None = None,
        generation: int = 0,
        org_only: bool = False,
        ttl_seconds: int = DEFAULT_TTL_SECONDS,
        *,
        now: float | None = None,
    ) -> tuple[str, Claims]:
        """The signed token and its claims (for the audit record); whom it is for follows
        :func:`token_subject`."""
        customer_id, org_only = token_subject(customer_id, org_only)
        if not isinstance(customer_id, str) or not _ID_RE.match(customer_id):
            raise ValueError("bad customer id")
        if resource_id is not None and not (isinstance(resource_id, str) and _RES_RE.match(resource_id)):
            raise ValueError("bad resource id")
        if isinstance(generation, bool) or not isinstance(generation, int) or generation < 0:
            raise ValueError("generation must be a non-negative integer")
        if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int) or not 0 < ttl_seconds <= MAX_TTL_SECONDS:
            raise ValueError(f"ttl_seconds must be an integer in [1, {MAX_TTL_SECONDS}]")
        issued_at = int(time.time() if now is None else now)
        claims = Claims(
            customer_id=customer_id,
            resource_id=resource_id,
            generation=generation,
            org_only=bool(org_only),
            jti=secrets.token_urlsafe(16),
            expires_at=issued_at + ttl_seconds,
            issued_at=issued_at,
        )
        payload = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": claims.customer_id,
            "gen": claims.generation,
            "org": claims.org_only,
            "iat": issued_at,
            "nbf": issued_at,
            "exp": claims.expires_at,
            "jti": claims.jti,
        }
        if resource_id is not None:
            payload["rid"] = resource_id
        token = jwt.encode(payload, self._private_key, algorithm="EdDSA", headers={"typ": "JWT"})
        return token, claims

    def issue(
        self,
        customer_id: str | None,
        resource_id: str | None = None,
        generation: int = 0,
        org_only: bool = False,
        ttl_seconds: int = DEFAULT_TTL_SECONDS,
    ) -> str:
        return self.issue_with_claims(customer_id, resource_id, generation, org_only, ttl_seconds)[0]

    # ---- verifying

    def verify(self, token: object) -> Claims:
        """Check signature, algorithm, issuer, audience, times and claim types; return the
        claims. Raise :class:`AuthError` (never quoting the token) otherwise."""
        if isinstance(token, bytes):
            try:
                token = token.decode("ascii")
            except UnicodeDecodeError:
                raise AuthError("registration token malformed") from None
        if not isinstance(token, str):
            raise AuthError("registration token malformed")
        token = token.strip()
        if not token:
            raise AuthError("registration token missing")
        if len(token) > MAX_TOKEN_LENGTH:
            raise AuthError("registration token too long")
        if not _TOKEN_CHARS_RE.match(token):
            raise AuthError("registration token malformed")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("registration token malformed") from None
        if header.get("alg") not in ALGORITHMS:
            raise AuthError("registration token alg not allowed")
        if "crit" in header:
            raise AuthError("registration token malformed")
        options = {"require": REQUIRED_CLAIMS, "verify_signature": True}
        try:
            payload = jwt.decode(
                token,
                self._public_key,
                algorithms=ALGORITHMS,
                audience=AUDIENCE,
                issuer=ISSUER,
                leeway=LEEWAY_SECONDS,
                options=options,
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("registration token expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("registration token not yet valid") from None
        except jwt.InvalidSignatureError:
            raise AuthError("registration token signature invalid") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError("registration token alg not allowed") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"registration token lacks the {exc.claim!r} claim") from None
        except jwt.InvalidAudienceError:
            raise AuthError("registration token audience invalid") from None
        except jwt.InvalidIssuerError:
            raise AuthError("registration token issuer invalid") from None
        except jwt.InvalidIssuedAtError:
            raise AuthError("registration token issued in the future") from None
        except jwt.DecodeError:
            raise AuthError("registration token malformed") from None
        except jwt.PyJWTError:
            raise AuthError("registration token invalid") from None
        except Exception:  # noqa: BLE001 - never let a parser bug leak the token in a traceback
            raise AuthError("registration token malformed") from None
        return _claims_from_payload(payload)


def _claims_from_payload(payload: dict) -> Claims:
    # Exact string audience and issuer (PyJWT also accepts an audience list).
    if payload.get("aud") != AUDIENCE:
        raise AuthError("registration token audience invalid")
    if payload.get("iss") != ISSUER:
        raise AuthError("registration token issuer invalid")
    sub = payload.get("sub")
    if not isinstance(sub, str) or not _ID_RE.match(sub):
        raise AuthError("registration token subject invalid")
    jti = payload.get("jti")
    if not isinstance(jti, str) or not 0 < len(jti) <= 128:
        raise AuthError("registration token jti invalid")
    for name in ("exp", "iat"):
        if isinstance(payload.get(name), bool) or not isinstance(payload.get(name), (int, float)):
            raise AuthError(f"registration token {name} invalid")
    gen = payload.get("gen", 0)
    if isinstance(gen, bool) or not isinstance(gen, int) or gen < 0:
        raise AuthError("registration token gen invalid")
    org = payload.get("org", False)
    if not isinstance(org, bool):
        raise AuthError("registration token org invalid")
    if org != (sub == ORG_CUSTOMER_ID):
        raise AuthError("registration token org claim does not match its subject")
    rid = payload.get("rid")
    if rid is not None and not (isinstance(rid, str) and _RES_RE.match(rid)):
        raise AuthError("registration token rid invalid")
    return Claims(
        customer_id=sub,
        resource_id=rid,
        generation=gen,
        org_only=org,
        jti=jti,
        expires_at=int(payload["exp"]),
        issued_at=int(payload["iat"]),
    )


async def check_against_state(
    claims: Claims,
    state: RelayState,
    resource_name: str,
    allocate: Callable[[set[int]], int] | None = None,
    before_create: Callable[[str], Awaitable[None]] | None = None,
    quota: Callable[[str, int], None] | None = None,
    *,
    create: bool = True,
) -> dict | None:
    """The resource ``resource_name`` that the verified ``claims`` may serve; created (port
    from ``allocate(taken_ports)``, default: a free port on 127.0.0.1) when the token is
    customer-wide and the customer has no such resource yet, after ``await
    before_create(customer_id)`` (which may raise, e.g. over quota) and with ``quota(customer_id,
    count)`` checked in the creating transaction (see
    :meth:`relay.state.RelayState.get_or_create_resource`). With ``create=False`` such
    a resource is not created and the answer is None (a check-only registration). Raise
    :class:`AuthError` (and :class:`relay.state.store.errors.StoreUnavailable` while the state
    database is away)."""
    customer_id = ORG_CUSTOMER_ID if claims.org_only else claims.customer_id
    if await state.get_customer(customer_id) is None:
        raise AuthError("registration token's customer does not exist")
    if claims.resource_id is not None:
        resource = await state.get_resource(claims.resource_id)
        if resource is None or resource["customer_id"] != customer_id:
            raise AuthError("registration token's resource does not exist")
        if resource["name"] != resource_name:
            raise AuthError("registration token is for another resource name")
        if claims.generation < resource["generation"]:
            raise AuthError("registration token revoked")
        return resource
    resource = await state.find_resource(customer_id, resource_name)
    if resource is not None:
        if claims.generation < resource["generation"]:
            raise AuthError("registration token revoked")
        return resource
    if not create:
        return None
    if before_create is not None:
        await before_create(customer_id)
    if allocate is None:
        allocate = lambda taken: allocate_port("127.0.0.1", taken)  # noqa: E731
    try:
        return await state.get_or_create_resource(
            customer_id, resource_name, allocate,
            quota=None if quota is None else lambda count: quota(customer_id, count))
    except ValueError as exc:
        raise AuthError(str(exc), code="bad_request") from None


def _load_or_create_key(path: Path) -> Ed25519PrivateKey:
    if path.exists():
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"cannot load the signing key {path}: {exc.__class__.__name__}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"the signing key {path} is not an Ed25519 key")
        return key
    ensure_state_dir(path.parent)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        # Not write_private's replace: if another process created it meanwhile, keep theirs.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _load_or_create_key(path)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
        fh.flush()
        os.fsync(fh.fileno())
    return key


__all__ = [
    "AUDIENCE",
    "ISSUER",
    "Claims",
    "TokenAuthority",
    "check_against_state",
    "token_subject",
]
