"""Agent identities on a real relay: ``agents list`` (certificate or token, scope, serial,
expiry, revoked, linked now), ``agents revoke`` (the link dropped at once, the instance refused
at its next link and at renewal), rotation revoking the certificates of that resource,
``--require-agent-certificates`` (a token link refused, or admitted to enrol only), and
``resources list --extended`` naming each link's identity."""

from __future__ import annotations

import asyncio
import json

from cryptography import x509

from tests.faults.faultkit import auth_message, hand_link, register, until
from tests.faults.test_enrolment import csr


async def ask(link, recorder, message: dict, prefix: str = "enroll") -> dict:
    before = len(recorder.messages)
    link.send_control(message)
    await until(lambda: any(m.get("type", "").startswith(prefix) for m in recorder.messages[before:]), 15,
                "the relay's answer")
    return next(m for m in recorder.messages[before:] if m.get("type", "").startswith(prefix))


def agents_list(relay, *args: str) -> dict[str, dict]:
    return {a["instance"]: a for a in json.loads(relay.cli("agents", "list", "--output", "json", *args).stdout)}


def test_agents_list_and_revoke(relay):
    def cli(*args, check=True):
        # Off the loop: the hand-driven links must go on answering keepalives meanwhile.
        return asyncio.to_thread(relay.cli, *args, check=check)

    customer = relay.create_customer("acme")
    other = relay.create_customer("globex")
    rid = relay.cli("resources", "create", "--customer-id", customer, "db").stdout.split()[0]
    token = relay.jwt("--customer-id", customer, "--resource-id", rid)
    wide = relay.jwt("--customer-id", customer)

    async def main():
        a, a_rec = await register(relay, token, ["db"], instance="inst-a")
        enrolled = await ask(a, a_rec, {"type": "enroll", "csr": csr("inst-a")})
        b, b_rec = await register(relay, wide, ["db"], instance="inst-b")
        assert a_rec.first("registered") and b_rec.first("registered")
        listed = await asyncio.to_thread(agents_list, relay)
        table = (await cli("agents", "list")).stdout
        assert (await cli("agents", "list", "--customer", other, "--output", "json")).stdout.strip() == "[]"
        detail = (await asyncio.to_thread(relay.resource, customer, "db"))["agents_detail"]
        extended = (await cli("resources", "list", "--extended")).stdout

        revoked = await cli("agents", "revoke", "inst-a")
        # Dropped at once, told why.
        await until(lambda: a_rec.closed, 10, "the revoked agent's link to close")
        c, c_rec = await register(relay, token, ["db"], instance="inst-a")  # its token is still valid
        after = await asyncio.to_thread(agents_list, relay)
        # The other instance is untouched and still renews.
        renewed = await ask(b, b_rec, {"type": "enroll", "csr": csr("inst-b")})
        unknown = await cli("agents", "revoke", "inst-zz", check=False)
        a.close()
        b.close()
        c.close()
        return enrolled, listed, table, detail, extended, revoked, a_rec, c_rec, after, renewed, unknown

    enrolled, listed, table, detail, extended, revoked, a_rec, c_rec, after, renewed, unknown = asyncio.run(main())
    cert = x509.load_pem_x509_certificates(enrolled["certificate"].encode())[0]
    a = listed["inst-a"]
    assert (a["customer_id"], a["identity"], a["scope"], a["resource_ids"]) == (customer, "certificate", "resource",
                                                                                 [rid])
    assert a["serial"] == format(cert.serial_number, "x") and a["linked"] and a["links"] == 1
    assert a["expires_at"] == cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ") and not a["revoked"]
    b = listed["inst-b"]
    assert (b["identity"], b["serial"], b["linked"], b["revoked"]) == ("token", None, True, False)
    assert "inst-a" in table and "INSTANCE" in table and "token" in table
    # resources list --extended: each link's identity (these links registered by token).
    assert sorted((d["instance"], d["identity"], d["cert_serial"]) for d in detail) == [
        ("inst-a", "token", None), ("inst-b", "token", None)]
    header, rows = extended.split("\n\n")[1].splitlines()[0], extended.split("\n\n")[1].splitlines()[1:]
    assert "INSTANCE  IDENTITY" in header and all(" token " in row for row in rows) and len(rows) == 2

    assert f"revoked agent instance inst-a of customer {customer} (1 certificate(s))" in revoked.stdout
    assert a_rec.messages[-1]["type"] == "error" and a_rec.messages[-1]["code"] == "revoked"
    assert c_rec.first("registered") is None and c_rec.first("error")["code"] == "revoked"
    assert after["inst-a"]["revoked"] and not after["inst-a"]["linked"]
    assert after["inst-a"]["revoked_reason"] == "revoked by the operator"
    assert not after["inst-b"]["revoked"] and after["inst-b"]["linked"]
    assert renewed["type"] == "enrolled"
    assert unknown.returncode == 1 and "no agent instance inst-zz" in unknown.stderr
    assert "Traceback" not in relay.proc.log()


def test_rotation_revokes_the_certificates_of_that_resource_and_a_revocation_keeps_its_reason(relay):
    def cli(*args, check=True):
        # Off the loop: the hand-driven links must go on answering keepalives meanwhile.
        return asyncio.to_thread(relay.cli, *args, check=check)

    customer = relay.create_customer("acme")
    rid = relay.cli("resources", "create", "--customer-id", customer, "db").stdout.split()[0]
    token = relay.jwt("--customer-id", customer, "--resource-id", rid)

    async def main():
        a, a_rec = await register(relay, token, ["db"], instance="inst-r")
        first = await ask(a, a_rec, {"type": "enroll", "csr": csr("inst-r")})
        await cli("resources", "registration-jwt", "--customer-id", customer, "--resource-id", rid, "--rotate")
        await until(lambda: a_rec.closed, 10, "the rotated agent's link to close")
        return first

    first = asyncio.run(main())
    assert first["type"] == "enrolled"
    entry = agents_list(relay)["inst-r"]
    # The certificate is revoked (its scope is the rotated resource); the instance may enrol again.
    assert entry["revoked"] and entry["revoked_reason"] == "registration token rotated"
    token = relay.jwt("--customer-id", customer, "--resource-id", rid)

    async def again():
        a, a_rec = await register(relay, token, ["db"], instance="inst-r")
        answer = await ask(a, a_rec, {"type": "enroll", "csr": csr("inst-r")})
        await cli("agents", "revoke", "inst-r", "--customer", customer, "--reason", "host decommissioned")
        await until(lambda: a_rec.closed, 10, "the revoked agent's link to close")
        return answer

    assert asyncio.run(again())["type"] == "enrolled"
    entry = agents_list(relay)["inst-r"]
    assert entry["certificates"] == 2 and entry["revoked_reason"] == "host decommissioned"


def test_require_agent_certificates_admits_token_links_to_enrol_only(relay):
    relay.stop()
    relay.start(RELAY_REQUIRE_AGENT_CERTIFICATES="1")
    customer = relay.create_customer("acme")
    token = relay.jwt("--customer-id", customer)

    async def main():
        plain, plain_rec = await register(relay, token, ["db"], instance="old-agent")
        link, rec = await hand_link(relay)
        link.send_control(auth_message(token, ["db"], instance="new-agent", features=["enroll"]))
        await until(lambda: rec.first("enroll_only") or rec.closed, 15, "the relay's answer")
        link.send_control({"type": "add_resources", "resources": [{"name": "api"}]})  # ignored
        answer = await ask(link, rec, {"type": "enroll", "csr": csr("new-agent")})
        await until(lambda: rec.closed, 10, "the relay to close the enrolment link")
        # Revoked while another of its links waits to enrol: its renewal is refused.
        again, again_rec = await hand_link(relay)
        again.send_control(auth_message(token, ["db"], instance="new-agent", features=["enroll"]))
        await until(lambda: again_rec.first("enroll_only"), 15, "the relay's answer")
        await asyncio.to_thread(relay.cli, "agents", "revoke", "new-agent")
        renewal = await ask(again, again_rec, {"type": "enroll", "csr": csr("new-agent")})
        again.close()
        return plain_rec, rec, answer, renewal

    plain_rec, rec, answer, renewal = asyncio.run(main())
    assert renewal["type"] == "enroll_failed" and renewal["code"] == "revoked"
    error = plain_rec.first("error")
    assert plain_rec.first("registered") is None and plain_rec.closed
    assert error["code"] == "certificate_required" and "requires agent certificates" in error["message"]
    assert rec.first("registered") is None and rec.first("enroll_only")["relay_id"].startswith("rly_")
    assert answer["type"] == "enrolled" and rec.first("resources_added") is None
    # Nothing was registered or created for traffic; the instance holds a certificate.
    assert relay.resources() == []
    entry = agents_list(relay)["new-agent"]
    assert (entry["identity"], entry["scope"], entry["linked"], entry["revoked"]) == (
        "certificate", "customer", False, True)
    assert "old-agent" not in agents_list(relay)
    assert "Traceback" not in relay.proc.log()
