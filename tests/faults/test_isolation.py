"""Customers stay apart: no JWT of one customer registers into, takes over or receives the
streams of another's resource, even with colliding resource names, rotations and
organisation-only tokens. A stateful model checks relay.control.tokens.check_against_state against
relay.state.relay_state; a real-process test checks two customers that both name their resource "db"."""

from __future__ import annotations

import itertools
import shutil
import tempfile

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from relay.state.relay_state import ORG_CUSTOMER_ID, RelayState
from relay.control.tokens import TokenAuthority, check_against_state
from tests.faults.faultkit import echo_once, setup_agent
from tests.helpers.sync_state import SyncState, new_loop
from tunnel.wire.errors import AuthError

NAMES = st.sampled_from(["db", "sftp", "api", "DB", "db-2"])  # collide across customers


class Isolation(RuleBasedStateMachine):
    customers = Bundle("customers")
    tokens = Bundle("tokens")

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="iso-")
        loop = new_loop()
        self.state = SyncState(loop.run_until_complete(RelayState.open(self.dir)), loop)
        self.authority = TokenAuthority(private_key=Ed25519PrivateKey.generate())
        self.ports = itertools.count(20000)
        self.serial = itertools.count()
        #: (customer, name) -> resource id; id -> (customer, name, generation)
        self.by_name: dict[tuple[str, str], str] = {}
        self.resources: dict[str, list] = {}

    def teardown(self) -> None:
        self.state.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _allocate(self, taken: set[int]) -> int:
        port = next(self.ports)
        while port in taken:
            port = next(self.ports)
        return port

    @rule(target=customers, name=st.sampled_from(["acme", "globex", "acme"]))
    def create_customer(self, name):
        # Customer names are unique (relay.state.name_key): a serial keeps them apart.
        return self.state.create_customer(f"{name} {next(self.serial)}")["id"]

    @rule(target=customers)
    def org(self):
        return ORG_CUSTOMER_ID

    @rule(target=tokens, customer=customers)
    def customer_wide_token(self, customer):
        org = customer == ORG_CUSTOMER_ID
        token = self.authority.issue(None if org else customer, org_only=org)
        return (token, customer, None)

    @rule(target=tokens, customer=customers, data=st.data())
    def resource_token(self, customer, data):
        """A token bound to some resource id: its own customer's, or (forged claims aside,
        an operator mistake) issued naming another customer's resource id."""
        if not self.resources:
            return (self.authority.issue(None if customer == ORG_CUSTOMER_ID else customer,
                                         org_only=customer == ORG_CUSTOMER_ID), customer, None)
        rid = data.draw(st.sampled_from(list(self.resources)))
        gen = self.resources[rid][2]
        org = customer == ORG_CUSTOMER_ID
        token = self.authority.issue(None if org else customer, rid, generation=gen, org_only=org)
        return (token, customer, rid)

    @rule(token=tokens, name=NAMES)
    def register(self, token, name):
        token, customer, rid = token
        claims = self.authority.verify(token)
        owner = ORG_CUSTOMER_ID if claims.org_only else claims.customer_id
        assert owner == customer
        try:
            got = self.state.run(check_against_state(claims, self.state.state, name, allocate=self._allocate))
        except AuthError:
            got = None
        # What the model allows.
        if rid is not None:
            known = self.resources.get(rid)
            ok = (known is not None and known[0] == customer and known[1] == name
                  and claims.generation >= known[2])
            if ok:
                assert got is not None and got["id"] == rid
            else:
                assert got is None, f"token for {rid} of {customer} registered into {got}"
            return
        existing = self.by_name.get((customer, name))
        if existing is not None:
            if claims.generation >= self.resources[existing][2]:
                assert got is not None and got["id"] == existing
            else:
                assert got is None, "revoked customer-wide token accepted"
            return
        assert got is not None
        assert got["customer_id"] == customer and got["name"] == name
        assert got["id"] not in self.resources
        self.by_name[(customer, name)] = got["id"]
        self.resources[got["id"]] = [customer, name, got["generation"]]

    @rule(data=st.data())
    def rotate(self, data):
        if not self.resources:
            return
        rid = data.draw(st.sampled_from(list(self.resources)))
        self.resources[rid][2] = self.state.rotate_resource(rid)

    @rule(data=st.data())
    def delete(self, data):
        if not self.resources:
            return
        rid = data.draw(st.sampled_from(list(self.resources)))
        customer, name, _ = self.resources.pop(rid)
        del self.by_name[(customer, name)]
        assert self.state.delete_resource(rid)

    @invariant()
    def state_matches_model(self):
        rows = self.state.list_resources()
        assert {r["id"]: (r["customer_id"], r["name"]) for r in rows} == {
            rid: (c, n) for rid, (c, n, _) in self.resources.items()}
        ports = [r["port"] for r in rows]
        assert len(ports) == len(set(ports)), "two resources share an endpoint port"


Isolation.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
test_isolation_model = Isolation.TestCase


def test_same_resource_name_two_customers_distinct_endpoints(relay, agents, service_factory):
    svc_a, svc_b = service_factory("echo"), service_factory("speak-first", b"I am customer B's service")
    # No idle check of the services: their connection counts are the streams' alone.
    quiet = {"TUNNEL_TARGET_CHECK_INTERVAL": "0"}
    a, _, _, addr_a = setup_agent(relay, agents, svc_a, "wss", customer_name="alpha", **quiet)
    b, _, _, addr_b = setup_agent(relay, agents, svc_b, "quic", customer_name="beta", **quiet)
    assert addr_a != addr_b
    ra, rb = relay.resource(a, "db"), relay.resource(b, "db")
    assert ra["id"] != rb["id"] and ra["customer_id"] == a and rb["customer_id"] == b
    for _ in range(5):
        assert echo_once(addr_a, b"for alpha") == b"for alpha"
        assert echo_once(addr_b, b"x") == b"I am customer B's service"
    assert svc_a.connections == 5 and svc_b.connections == 5
