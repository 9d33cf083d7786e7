"""One rule for organisation-only tokens, on the CLI and the API alike
(relay.control.tokens.token_subject): ``--org-only``, ``--customer-id cus_org`` and both mean the
same token, and every token the relay issues works. ``--org-only`` with another customer is
refused with the same words by both.

Found in a hostile review: ``POST /v1/registration-jwt`` for ``cus_org`` without
``org_only`` issued a JWT the relay then refused. About 5 s."""

from __future__ import annotations

import asyncio

import pytest

from relay.control.admin_client import AdminClient, AdminError
from tests.faults.faultkit import FAST, register


def test_org_tokens_from_cli_and_api_all_work(relay, agents, service_factory):
    service = service_factory("echo")
    api = AdminClient.discover(relay.state_dir)
    issue = {
        "api customer_id cus_org": lambda: api.registration_jwt("cus_org"),
        "cli --customer-id cus_org": lambda: relay.jwt("--customer-id", "cus_org"),
        "api org_only": lambda: api.registration_jwt(org_only=True),
        "cli --org-only": lambda: relay.jwt("--org-only"),
        "cli both": lambda: relay.jwt("--customer-id", "cus_org", "--org-only"),
    }

    async def works(token: str, name: str):
        link, rec = await register(relay, token, [name])
        link.close()
        return rec

    tokens = {}
    for i, (how, make) in enumerate(issue.items()):
        tokens[how] = make()
        rec = asyncio.run(works(tokens[how], f"org{i}"))
        assert rec.first("registered"), (how, rec.messages)
    agents.start(f"wss://127.0.0.1:{relay.port}", tokens["api customer_id cus_org"], "orgdb", service.port,
                 ca_file=relay.ca_file, **FAST)
    relay.wait_available("cus_org", "orgdb")


def test_org_only_with_another_customer_is_one_error_everywhere(relay):
    customer = relay.create_customer("acme")
    cli = relay.cli("resources", "registration-jwt", "--customer-id", customer, "--org-only", check=False)
    with pytest.raises(AdminError) as api:
        AdminClient.discover(relay.state_dir).registration_jwt(customer, org_only=True)
    reason = f"an organisation-only token belongs to cus_org, not to {customer}"
    assert cli.returncode == 1 and reason in cli.stderr, cli.stderr
    assert reason in str(api.value)
