"""The relay's record of agent identities (relay.state.relay_state, schema step 7) on both back
ends: certificates recorded at enrolment, an instance revoked with its certificates, the
revoked set answered from memory, rotation and deletion revoking the certificates scoped to
that resource only, a revoked instance's links refused, expired rows pruned."""

from __future__ import annotations

import datetime as dt
import time

import pytest

from relay.state.relay_state import CERTIFICATE_RETENTION, REVOKED_AGENT_RETENTION, LinkRefused

from test_store import link_row


def later(hours: float = 24) -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=hours)


def test_revoking_an_instance_revokes_its_certificates_and_refuses_it_everywhere(state):
    acme = state.create_customer("acme")["id"]
    globex = state.create_customer("globex")["id"]
    db = state.get_or_create_resource(acme, "db", lambda taken: 21001)
    big = 2 ** 158 + 7  # certificate serials take up to 159 bits
    state.record_agent_certificate(serial=big, instance="inst-a", customer_id=acme, resource_ids=[db["id"]],
                                   not_after=later())
    state.record_agent_certificate(serial=5, instance="inst-a", customer_id=acme, resource_ids=[db["id"]],
                                   not_after=later())
    state.record_agent_certificate(serial=6, instance="inst-b", customer_id=acme, resource_ids=None,
                                   not_after=later())
    state.record_agent_certificate(serial=7, instance="inst-a", customer_id=globex, resource_ids=None,
                                   not_after=later())
    assert not state.agent_certificate_revoked(big)

    with pytest.raises(ValueError, match="several customers"):
        state.revoke_agent("inst-a")
    with pytest.raises(KeyError):
        state.revoke_agent("nobody", acme)
    assert state.revoke_agent("inst-a", acme) == {"customer_id": acme, "instance": "inst-a", "certificates": 2}
    # From memory at once, on this relay.
    assert state.agent_certificate_revoked(big) and state.agent_certificate_revoked(5)
    assert not state.agent_certificate_revoked(6) and not state.agent_certificate_revoked(7)
    assert state.agent_instance_revoked(acme, "inst-a") and not state.agent_instance_revoked(globex, "inst-a")

    # No new certificate for it (recorded revoked, the enrolment refused), and no link.
    with pytest.raises(LinkRefused) as refused:
        state.record_agent_certificate(serial=8, instance="inst-a", customer_id=acme, resource_ids=None,
                                       not_after=later())
    assert refused.value.code == "revoked" and state.agent_certificate_revoked(8)
    state.join_relay("rly_a", "wss://relay-a:443", "0.1.0")
    with pytest.raises(LinkRefused) as refused:
        state.add_link(link_row(acme, instance="inst-a"), [db["id"]], 0, quota=lambda count: None)
    assert refused.value.code == "revoked"
    state.add_link(link_row(acme, instance="inst-b"), [db["id"]], 0)

    agents = {(a["customer_id"], a["instance"]): a for a in state.list_agents(live_within=60)}
    a = agents[acme, "inst-a"]
    assert (a["certificates"], a["serial"], a["links"], a["revoked_reason"]) == (3, 8, 0, "revoked by the operator")
    assert a["revoked_at"] is not None and a["resource_ids"] is None
    b = agents[acme, "inst-b"]
    assert (b["serial"], b["resource_ids"], b["revoked_at"], b["links"]) == (6, None, None, 1)
    assert [a["instance"] for a in state.list_agents(globex)] == ["inst-a"]


def test_a_relay_reads_the_revocations_of_another(state, tmp_path, database_url):
    """What a relay re-reads on a hint (or at start): another RelayState on the same database."""
    from relay.state.relay_state import RelayState
    acme = state.create_customer("acme")["id"]
    state.record_agent_certificate(serial=11, instance="inst-a", customer_id=acme, resource_ids=None,
                                   not_after=later())
    other = state.run(RelayState.open(tmp_path / "state" if database_url is None else tmp_path / "other",
                                      database_url))
    try:
        assert not other.agent_certificate_revoked(11)
        state.revoke_agent("inst-a")
        state.run(other.read_revocations())
        assert other.agent_certificate_revoked(11) and other.agent_instance_revoked(acme, "inst-a")
    finally:
        state.run(other.close())


def test_rotation_and_deletion_revoke_the_certificates_scoped_to_that_resource_only(state):
    acme = state.create_customer("acme")["id"]
    db = state.get_or_create_resource(acme, "db", lambda taken: 21002)
    api = state.get_or_create_resource(acme, "api", lambda taken: 21003)
    for serial, scope in ((21, [db["id"]]), (22, [api["id"]]), (23, None)):
        state.record_agent_certificate(serial=serial, instance=f"inst-{serial}", customer_id=acme,
                                       resource_ids=scope, not_after=later())
    events = []
    state.subscribe(events.append)
    state.rotate_resource(db["id"])
    assert state.agent_certificate_revoked(21) and not state.agent_certificate_revoked(22)
    assert events[-1]["serials"] == ["21"]
    state.delete_resource(api["id"])
    assert state.agent_certificate_revoked(22)
    # A customer-wide certificate serves the customer's other resources: it stays.
    assert not state.agent_certificate_revoked(23)
    reasons = {a["instance"]: a["revoked_reason"] for a in state.list_agents(acme)}
    assert reasons == {"inst-21": "registration token rotated", "inst-22": "resource deleted", "inst-23": None}
    # The instances themselves are not revoked: they may enrol again with a new token.
    assert not state.agent_instance_revoked(acme, "inst-21")


def test_expired_records_are_pruned_after_their_retention(state):
    acme = state.create_customer("acme")["id"]
    old = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=CERTIFICATE_RETENTION + 60)
    state.record_agent_certificate(serial=31, instance="old", customer_id=acme, resource_ids=None, not_after=old)
    state.record_agent_certificate(serial=32, instance="new", customer_id=acme, resource_ids=None, not_after=later())
    state.revoke_agent("new")
    assert state.prune_agent_certificates() == 1
    assert [a["instance"] for a in state.list_agents()] == ["new"]
    assert state.prune_agent_certificates(now=time.time() + REVOKED_AGENT_RETENTION + CERTIFICATE_RETENTION) == 2
    assert state.list_agents() == []


def test_the_admin_api_refuses_what_it_cannot_revoke(admin_server):
    """GET /v1/agents, and POST /v1/agents/{instance}/revoke's refusals (the revocation itself:
    tests/faults/test_agent_identities.py, on a real relay)."""
    from test_admin import Api

    api = Api(admin_server)
    try:
        server = admin_server
        acme = server.call(server.state.create_customer, "acme")["id"]
        globex = server.call(server.state.create_customer, "globex")["id"]
        for serial, customer in ((41, acme), (42, globex)):
            server.call(server.state.record_agent_certificate, serial=serial, instance="inst-a", customer_id=customer,
                        resource_ids=None, not_after=later())
        status, listed, _ = api.request("GET", f"/v1/agents?customer_id={acme}")
        assert status == 200 and [(a["instance"], a["serial"], a["scope"], a["identity"], a["linked"])
                                  for a in listed] == [("inst-a", "29", "customer", "certificate", False)]
        status, body, _ = api.request("POST", "/v1/agents/inst-a/revoke", {})
        assert status == 409 and "several customers" in body["message"]
        status, body, _ = api.request("POST", "/v1/agents/inst-zz/revoke", {"customer_id": acme})
        assert status == 404 and "no agent instance inst-zz of customer" in body["message"]
        status, body, _ = api.request("POST", "/v1/agents/inst-a/revoke", {"customer_id": acme, "reason": "a\nb"})
        assert status == 400 and body["error"] == "bad_request"
        status, body, _ = api.request("POST", "/v1/agents/inst-a/revoke", {"instance": "x"})
        assert status == 400 and "unknown field" in body["message"]
        status, body, _ = api.request("POST", "/v1/agents/in%20st/revoke", {})
        assert status == 404
        status, body, _ = api.request("GET", "/v1/agents", token="wrong")
        assert status == 401
        assert not server.call(server.state.list_agents)[0]["revoked_at"]
    finally:
        api.close()


def test_a_link_record_names_its_certificate_for_the_other_relays(state):
    """What ``resources list --extended`` shows of another relay's links: the certificate a
    link authenticated with (serial, expiry), or ``token``."""
    from relay.state.cluster import link_view

    acme = state.create_customer("acme")["id"]
    db = state.get_or_create_resource(acme, "db", lambda taken: 21004)
    expiry = later()
    state.record_agent_certificate(serial=51, instance="inst-c", customer_id=acme, resource_ids=None, not_after=expiry)
    state.join_relay("rly_a", "wss://relay-a:443", "0.1.0")
    state.add_link({**link_row(acme, instance="inst-c"), "cert_serial": "51"}, [db["id"]], 0)
    state.add_link(link_row(acme, instance="inst-t", agent_id="agt_2"), [db["id"]], 0)
    views = {v["agent_instance"]: v for v in map(link_view, state.list_links())}
    assert (views["inst-c"]["identity"], views["inst-c"]["cert_serial"], views["inst-c"]["cert_expires_at"]) == (
        "certificate", "33", expiry.strftime("%Y-%m-%dT%H:%M:%SZ"))
    assert (views["inst-t"]["identity"], views["inst-t"]["cert_serial"], views["inst-t"]["cert_expires_at"]) == (
        "token", None, None)
