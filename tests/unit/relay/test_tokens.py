"""relay.control.tokens: Ed25519 registration JWTs, their verification and the checks against state."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from relay.state.relay_state import ORG_CUSTOMER_ID
from relay.control.tokens import AUDIENCE, ISSUER, Claims, TokenAuthority, check_against_state
from tunnel.wire.errors import AuthError

CUSTOMER = "cus_abcdefghijklmnop"
RESOURCE = "res_abcdefghijklmnop"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**overrides) -> dict:
    now = int(time.time())
    payload = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": CUSTOMER,
        "gen": 0,
        "org": False,
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
        "jti": "jti-123",
    }
    for key, value in overrides.items():
        if value is DROP:
            payload.pop(key, None)
        else:
            payload[key] = value
    return payload


DROP = object()


@pytest.fixture
def key():
    return Ed25519PrivateKey.generate()


@pytest.fixture
def authority(key):
    return TokenAuthority(private_key=key)


def signed(key, payload: dict, headers: dict | None = None) -> str:
    return jwt.encode(payload, key, algorithm="EdDSA", headers=headers)


def rejected(authority: TokenAuthority, token, fragment: str) -> AuthError:
    with pytest.raises(AuthError) as info:
        authority.verify(token)
    message = str(info.value)
    assert fragment in message, message
    if isinstance(token, str) and token:
        assert token not in message
        for part in token.split("."):
            if len(part) > 8:
                assert part not in message
    # No chained PyJWT exception whose text or traceback could carry the token.
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__
    return info.value


# --------------------------------------------------------------------------- issuing


def test_issue_and_verify(authority):
    token = authority.issue(CUSTOMER, RESOURCE, generation=3, ttl_seconds=600)
    got = authority.verify(token)
    assert isinstance(got, Claims)
    assert (got.customer_id, got.resource_id, got.generation, got.org_only) == (CUSTOMER, RESOURCE, 3, False)
    assert got.expires_at - got.issued_at == 600
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "EdDSA"
    payload = jwt.decode(token, options={"verify_signature": False})
    assert payload["iss"] == "tunnel-relay" and payload["aud"] == "tunnel-agent"
    assert payload["sub"] == CUSTOMER and payload["rid"] == RESOURCE and payload["gen"] == 3
    assert payload["org"] is False and payload["jti"] == got.jti
    assert {"iat", "nbf", "exp"} <= set(payload)


def test_customer_wide_token_has_no_rid(authority):
    token = authority.issue(CUSTOMER)
    assert "rid" not in jwt.decode(token, options={"verify_signature": False})
    assert authority.verify(token).resource_id is None


def test_org_only_token(authority):
    got = authority.verify(authority.issue(None, org_only=True))
    assert got.customer_id == ORG_CUSTOMER_ID and got.org_only is True
    with pytest.raises(ValueError):
        authority.issue(CUSTOMER, org_only=True)


def test_jti_is_unique(authority):
    assert len({authority.verify(authority.issue(CUSTOMER)).jti for _ in range(20)}) == 20


@pytest.mark.parametrize(
    "kwargs",
    [
        {"customer_id": "nobody"},
        {"customer_id": CUSTOMER, "resource_id": "r1"},
        {"customer_id": CUSTOMER, "generation": -1},
        {"customer_id": CUSTOMER, "generation": True},
        {"customer_id": CUSTOMER, "ttl_seconds": 0},
        {"customer_id": CUSTOMER, "ttl_seconds": 100 * 365 * 86400},
    ],
)
def test_issue_rejects_bad_arguments(authority, kwargs):
    with pytest.raises(ValueError):
        authority.issue(**kwargs)


def test_signing_key_file_is_private_and_persistent(tmp_path):
    first = TokenAuthority(tmp_path / "state")
    key_file = tmp_path / "state" / "signing-key.pem"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    token = first.issue(CUSTOMER)
    again = TokenAuthority(tmp_path / "state")
    assert again.verify(token).customer_id == CUSTOMER


def test_signing_key_must_be_ed25519(tmp_path):
    (tmp_path / "s").mkdir()
    other = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "s" / "signing-key.pem").write_bytes(other)
    with pytest.raises(ValueError, match="Ed25519"):
        TokenAuthority(tmp_path / "s")


# --------------------------------------------------------------------------- rejections


def test_expired(authority):
    token, _ = authority.issue_with_claims(CUSTOMER, ttl_seconds=100, now=time.time() - 1000)
    rejected(authority, token, "registration token expired")


def test_small_clock_skew_is_tolerated(authority, key):
    now = int(time.time())
    assert authority.verify(signed(key, claims(exp=now - 5, iat=now - 100, nbf=now + 5))).jti == "jti-123"


def test_not_yet_valid(authority, key):
    now = int(time.time())
    rejected(authority, signed(key, claims(nbf=now + 3600)), "not yet valid")


def test_forged_signature_with_another_key(authority):
    forger = TokenAuthority(private_key=Ed25519PrivateKey.generate())
    rejected(authority, forger.issue(CUSTOMER), "signature invalid")


def test_tampered_payload(authority, key):
    token = authority.issue(CUSTOMER)
    header, _, signature = token.split(".")
    forged = ".".join([header, b64(json.dumps(claims(sub="cus_zzzzzzzzzzzzzzzz")).encode()), signature])
    rejected(authority, forged, "signature invalid")


def test_alg_none(authority):
    token = b64(b'{"alg":"none","typ":"JWT"}') + "." + b64(json.dumps(claims()).encode()) + "."
    rejected(authority, token, "alg not allowed")
    rejected(authority, token + "c2ln", "alg not allowed")


def _hs256(secret: bytes, payload: dict) -> str:
    signing_input = b64(b'{"alg":"HS256","typ":"JWT"}') + "." + b64(json.dumps(payload).encode())
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(mac)


def test_hs256_with_the_public_key_as_secret(authority):
    public = authority.public_key
    for secret in (
        public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw),
        public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH),
    ):
        rejected(authority, _hs256(secret, claims()), "alg not allowed")


def test_other_asymmetric_alg(authority):
    token = jwt.encode(claims(), ec.generate_private_key(ec.SECP256R1()), algorithm="ES256")
    rejected(authority, token, "alg not allowed")


def test_alg_header_mismatch_with_ed25519_signature(authority, key):
    # A real EdDSA signature but the header lies: still refused by the allow-list.
    token = signed(key, claims())
    _, payload, signature = token.split(".")
    rejected(authority, b64(b'{"alg":"EdDSA","crit":["x"]}') + "." + payload + "." + signature, "malformed")


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"iss": "someone-else"}, "issuer invalid"),
        ({"aud": "someone-else"}, "audience invalid"),
        ({"aud": [AUDIENCE]}, "audience invalid"),
        ({"aud": [AUDIENCE, "other"]}, "audience invalid"),
    ],
)
def test_other_issuer_or_audience(authority, key, overrides, fragment):
    rejected(authority, signed(key, claims(**overrides)), fragment)


@pytest.mark.parametrize("claim", ["exp", "iat", "iss", "aud", "sub", "jti"])
def test_missing_claims(authority, key, claim):
    rejected(authority, signed(key, claims(**{claim: DROP})), f"lacks the {claim!r} claim")


@pytest.mark.parametrize(
    "overrides",
    [
        {"gen": "1"},
        {"gen": True},
        {"gen": -1},
        {"gen": 1.5},
        {"org": "yes"},
        {"org": 1},
        {"org": True},  # org token whose subject is not cus_org
        {"sub": "cus_org", "org": False},
        {"rid": 5},
        {"rid": "not-a-resource"},
        {"sub": "someone"},
        {"sub": 5},
        {"jti": 5},
        {"jti": ""},
        {"exp": "tomorrow"},
        {"iat": "yesterday"},
    ],
)
def test_wrong_claim_types(authority, key, overrides):
    rejected(authority, signed(key, claims(**overrides)), "registration token")


@pytest.mark.parametrize("token", ["", "   ", "abc", "a.b", "a.b.c.d", "é.b.c", "a.b.c", None, 12, b"\xff\xfe"])
def test_garbage(authority, token):
    rejected(authority, token, "registration token")


def test_too_long(authority, key):
    token = signed(key, claims(pad="x" * 9000))
    rejected(authority, token, "too long")


# --------------------------------------------------------------------------- against state


# ``state`` (conftest.py): each back end in turn.


def check(claims, state, name, allocate=None, **kwargs):
    return state.run(check_against_state(claims, state.state, name, allocate, **kwargs))


def alloc(taken: set[int]) -> int:
    port = 22000
    while port in taken:
        port += 1
    return port


def test_customer_wide_token_creates_and_reuses_resources(authority, state):
    customer = state.create_customer("acme")
    got = authority.verify(authority.issue(customer["id"]))
    db = check(got, state, "db", alloc)
    assert db["customer_id"] == customer["id"] and db["name"] == "db" and db["port"] == 22000
    assert check(got, state, "db", alloc) == db
    api = check(got, state, "api", alloc)
    assert api["id"] != db["id"]


def test_check_only_creates_nothing(authority, state):
    """create=False (a dry-run registration): an unknown name is None and stays unknown."""
    customer = state.create_customer("acme")
    got = authority.verify(authority.issue(customer["id"]))
    assert check(got, state, "db", alloc, create=False) is None
    assert state.find_resource(customer["id"], "db") is None
    db = check(got, state, "db", alloc)
    assert check(got, state, "db", alloc, create=False) == db


def test_default_allocator_picks_a_free_port(authority, state):
    customer = state.create_customer("acme")
    resource = check(authority.verify(authority.issue(customer["id"])), state, "db")
    assert 20000 <= resource["port"] <= 29999


def test_unknown_customer(authority, state):
    with pytest.raises(AuthError, match="customer does not exist"):
        check(authority.verify(authority.issue(CUSTOMER)), state, "db", alloc)


def test_resource_token_must_match_its_resource(authority, state):
    customer = state.create_customer("acme")
    db = state.get_or_create_resource(customer["id"], "db", alloc)
    got = authority.verify(authority.issue(customer["id"], db["id"], db["generation"]))
    assert check(got, state, "db", alloc) == db
    with pytest.raises(AuthError, match="another resource name"):
        check(got, state, "api", alloc)
    assert state.find_resource(customer["id"], "api") is None


def test_other_customers_resource_is_rejected(authority, state):
    acme = state.create_customer("acme")
    evil = state.create_customer("evil")
    db = state.get_or_create_resource(acme["id"], "db", alloc)
    got = authority.verify(authority.issue(evil["id"], db["id"], db["generation"]))
    with pytest.raises(AuthError, match="resource does not exist"):
        check(got, state, "db", alloc)


def test_deleted_resource_token_is_rejected(authority, state):
    acme = state.create_customer("acme")
    db = state.get_or_create_resource(acme["id"], "db", alloc)
    got = authority.verify(authority.issue(acme["id"], db["id"]))
    state.delete_resource(db["id"])
    with pytest.raises(AuthError, match="resource does not exist"):
        check(got, state, "db", alloc)


def test_rotation_revokes_older_tokens(authority, state):
    acme = state.create_customer("acme")
    db = state.get_or_create_resource(acme["id"], "db", alloc)
    old = authority.verify(authority.issue(acme["id"], db["id"], 0))
    wide = authority.verify(authority.issue(acme["id"]))
    new_gen = state.rotate_resource(db["id"])
    new = authority.verify(authority.issue(acme["id"], db["id"], new_gen))
    with pytest.raises(AuthError, match="registration token revoked"):
        check(old, state, "db", alloc)
    with pytest.raises(AuthError, match="registration token revoked"):
        check(wide, state, "db", alloc)
    assert check(new, state, "db", alloc)["id"] == db["id"]
    # The customer-wide token still serves the customer's other resources.
    assert check(wide, state, "api", alloc)["name"] == "api"


def test_org_only_token_maps_to_the_org_customer(authority, state):
    got = authority.verify(authority.issue(None, org_only=True))
    resource = check(got, state, "test-db", alloc)
    assert resource["customer_id"] == ORG_CUSTOMER_ID
    assert state.get_customer(ORG_CUSTOMER_ID)["name"] == "organization"


def test_bad_resource_name_is_a_bad_request(authority, state):
    acme = state.create_customer("acme")
    with pytest.raises(AuthError) as info:
        check(authority.verify(authority.issue(acme["id"])), state, "x" * 500, alloc)
    assert info.value.code == "bad_request"


def test_token_subject_is_one_rule_for_org_only_tokens(authority):
    from relay.control.tokens import token_subject

    assert token_subject(None, True) == (ORG_CUSTOMER_ID, True)
    assert token_subject(ORG_CUSTOMER_ID, False) == (ORG_CUSTOMER_ID, True)
    assert token_subject(ORG_CUSTOMER_ID, True) == (ORG_CUSTOMER_ID, True)
    assert token_subject(CUSTOMER, False) == (CUSTOMER, False)
    with pytest.raises(ValueError, match="belongs to cus_org"):
        token_subject(CUSTOMER, True)
    with pytest.raises(ValueError, match="customer id is required"):
        token_subject(None, False)
    # Every token the authority issues is one it accepts.
    for customer_id, org_only in ((ORG_CUSTOMER_ID, False), (None, True), (CUSTOMER, False)):
        claims = authority.verify(authority.issue(customer_id, org_only=org_only))
        assert claims.org_only == (claims.customer_id == ORG_CUSTOMER_ID)
