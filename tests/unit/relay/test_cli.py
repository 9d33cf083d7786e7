"""tunnel-relay admin commands as subprocesses (``python -m relay``) against a real admin API."""

from __future__ import annotations

import json
import re
import socket

import pytest
from relay_fakes import fake_agent, one_line_error, run


def alloc(taken):
    port = 25000
    while port in taken:
        port += 1
    return port


def test_help():
    result = run(["--help"])
    assert result.returncode == 0
    for command in ("serve", "customers", "resources"):
        assert command in result.stdout
    result = run(["resources", "registration-jwt", "--help"])
    for option in ("--customer-id", "--org-only", "--resource-id", "--rotate", "--ttl"):
        assert option in result.stdout
    # Both ways to name whom the token is for are explained, not just listed.
    text = " ".join(result.stdout.split())
    assert "--customer-id ID the customer whose agents use the token" in text
    assert "--org-only a token for the organisation's own test resources" in text and "cus_org" in text


def test_a_missing_state_directory_is_named_as_such(tmp_path):
    """Admin commands run from another directory: the message names the missing state
    directory and --state-dir, not "the relay is not running"."""
    result = run(["customers", "list"], cwd=tmp_path)
    one_line_error(result, "no relay state directory ./relay-state")
    assert "--state-dir" in result.stderr and "not running" not in result.stderr


def test_customers_create_and_list(relay):
    created = relay("customers", "create", "Acme Corp")
    assert created.returncode == 0, created.stderr
    customer_id = created.stdout.strip()
    assert re.fullmatch(r"cus_[a-z2-7]{16}", customer_id)
    assert created.stdout == customer_id + "\n"

    table = relay("customers", "list")
    assert table.returncode == 0
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["ID", "NAME", "CREATED"]
    assert lines[1].startswith(customer_id) and "Acme Corp" in lines[1]

    as_json = relay("customers", "list", "--output", "json")
    assert as_json.returncode == 0
    assert json.loads(as_json.stdout) == relay.server.call(relay.server.state.list_customers)


def test_resources_list_formats(relay):
    server = relay.server
    customer = server.call(server.state.create_customer, "acme")
    db = server.call(server.state.get_or_create_resource, customer["id"], "db", alloc)
    api = server.call(server.state.get_or_create_resource, customer["id"], "api", alloc)
    server.registry.agents[db["id"]] = [fake_agent("agt_one", address="198.51.100.7:4444")]

    table = relay("resources", "list")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["ID", "NAME", "CUSTOMER", "STATUS", "ENDPOINT", "AGENTS", "TARGET"]
    # Columns are aligned: every row's STATUS starts where the header's does.
    column = lines[0].index("STATUS")
    assert lines[1][column:].startswith("AVAILABLE") and lines[1].split()[:2] == [db["id"], "db"]
    assert lines[2][column:].startswith("UNAVAILABLE") and lines[2].split()[:2] == [api["id"], "api"]
    assert f"127.0.0.1:{db['port']}" in lines[1]

    as_json = json.loads(relay("resources", "list", "--output", "json").stdout)
    assert [r["id"] for r in as_json] == [db["id"], api["id"]]
    assert as_json[0] == {"id": db["id"], "name": "db", "customer_id": customer["id"], "status": "AVAILABLE",
                          "endpoint": f"127.0.0.1:{db['port']}", "agents": 1, "target_status": "UNKNOWN",
                          "target_error": None, "allow": None, "effective_allow": None}

    extended = json.loads(relay("resources", "list", "--extended", "-o", "json").stdout)
    assert extended[0]["agents_detail"][0]["agent_id"] == "agt_one"
    assert extended[1]["agents_detail"] == []

    extended_table = relay("resources", "list", "--extended")
    assert extended_table.returncode == 0
    assert "agt_one" in extended_table.stdout and "198.51.100.7:4444" in extended_table.stdout
    assert "TRANSPORT" in extended_table.stdout


def test_registration_jwt_commands(relay):
    server = relay.server
    customer = server.call(server.state.create_customer, "acme")
    result = relay("resources", "registration-jwt", "--customer-id", customer["id"])
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert result.stdout == token + "\n" and token.count(".") == 2
    assert server.authority.verify(token).customer_id == customer["id"]

    path = server.state_dir.parent / "agent.jwt"
    path.write_text("old, world-readable\n")
    path.chmod(0o644)
    written = relay("resources", "registration-jwt", "--customer-id", customer["id"], "--output", str(path))
    assert written.returncode == 0 and written.stdout == "" and "mode 0600" in written.stderr
    assert path.stat().st_mode & 0o777 == 0o600
    assert server.authority.verify(path.read_text().strip()).customer_id == customer["id"]

    org = relay("resources", "registration-jwt", "--org-only", "--ttl", "600")
    claims = server.authority.verify(org.stdout.strip())
    assert claims.org_only and claims.expires_at - claims.issued_at == 600

    db = server.call(server.state.get_or_create_resource, customer["id"], "db", alloc)
    rotated = relay("resources", "registration-jwt", "--customer-id", customer["id"],
                    "--resource-id", db["id"], "--rotate")
    assert rotated.returncode == 0, rotated.stderr
    claims = server.authority.verify(rotated.stdout.strip())
    assert (claims.resource_id, claims.generation) == (db["id"], 1)
    assert server.registry.dropped == [(db["id"], 1)]


def test_registration_jwt_output_file_is_private(relay, tmp_path):
    """--output FILE writes the token with mode 0600, also over a file that was world-readable."""
    server = relay.server
    customer = server.call(server.state.create_customer, "acme")
    path = tmp_path / "agent.jwt"
    path.write_text("old")
    path.chmod(0o644)
    result = relay("resources", "registration-jwt", "--customer-id", customer["id"], "--output", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert path.stat().st_mode & 0o777 == 0o600
    assert server.authority.verify(path.read_text().strip()).customer_id == customer["id"]
    fresh = tmp_path / "fresh.jwt"
    assert relay("resources", "registration-jwt", "--org-only", "-o", str(fresh)).returncode == 0
    assert fresh.stat().st_mode & 0o777 == 0o600
    one_line_error(relay("resources", "registration-jwt", "--org-only", "--output", str(tmp_path / "no" / "x")),
                   "cannot write")


def test_registration_jwt_usage_errors(relay):
    server = relay.server
    customer = server.call(server.state.create_customer, "acme")
    # Whom a token is for is the relay's one rule (relay.control.tokens.token_subject), the API's words.
    one_line_error(relay("resources", "registration-jwt", "--customer-id", customer["id"], "--org-only"),
                   "HTTP 400: an organisation-only token belongs to cus_org")
    one_line_error(relay("resources", "registration-jwt"), "HTTP 400: a customer id is required")
    both = relay("resources", "registration-jwt", "--customer-id", "cus_org", "--org-only")
    assert server.authority.verify(both.stdout.strip()).org_only
    one_line_error(relay("resources", "registration-jwt", "--customer-id", customer["id"], "--rotate"),
                   "--rotate needs --resource-id")
    one_line_error(relay("resources", "registration-jwt", "--customer-id", "cus_aaaaaaaaaaaaaaaa"),
                   "HTTP 404: no such customer")
    assert relay("resources", "registration-jwt", "--org-only", "--ttl", "-1").returncode == 2


def test_resources_delete(relay):
    server = relay.server
    customer = server.call(server.state.create_customer, "acme")
    db = server.call(server.state.get_or_create_resource, customer["id"], "db", alloc)
    result = relay("resources", "delete", db["id"])
    assert result.returncode == 0, result.stderr
    assert server.registry.deleted == [db["id"]]
    one_line_error(relay("resources", "delete", db["id"]), "HTTP 404")


def test_admin_url_and_token_from_the_environment(admin_server, tmp_path):
    env = {"RELAY_ADMIN_URL": admin_server.url, "RELAY_ADMIN_TOKEN": admin_server.token}
    result = run(["customers", "create", "from-env"], env=env, cwd=tmp_path, secret=admin_server.token)
    assert result.returncode == 0, result.stderr
    listed = run(["customers", "list", "-o", "json", "--admin-url", admin_server.url],
                 env={"RELAY_ADMIN_TOKEN": admin_server.token}, cwd=tmp_path, secret=admin_server.token)
    assert [c["name"] for c in json.loads(listed.stdout)] == ["from-env"]


def test_state_dir_from_the_environment_and_global_option(admin_server, tmp_path):
    result = run(["customers", "list"], env={"RELAY_STATE_DIR": str(admin_server.state_dir)}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    result = run(["--state-dir", str(admin_server.state_dir), "customers", "list"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("where", ["first", "group", "last"])
def test_global_options_before_or_after_the_subcommand(admin_server, tmp_path, where):
    option = ["--state-dir", str(admin_server.state_dir)]
    args = {"first": [*option, "customers", "list"], "group": ["customers", *option, "list"],
            "last": ["customers", "list", *option]}[where]
    result = run(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def test_default_state_dir_is_relay_state_in_the_working_directory(admin_server):
    # admin_server lives in <tmp>/relay-state: run from <tmp> with no options.
    result = run(["customers", "list", "-o", "json"], cwd=admin_server.state_dir.parent)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_wrong_token(admin_server, tmp_path):
    result = run(["customers", "list"], env={"RELAY_ADMIN_URL": admin_server.url,
                                               "RELAY_ADMIN_TOKEN": "not-the-token"}, cwd=tmp_path)
    one_line_error(result, "refused the admin token")
    assert "not-the-token" not in result.stderr


def test_relay_not_running(tmp_path):
    (tmp_path / "stopped").mkdir()
    one_line_error(run(["customers", "list", "--state-dir", str(tmp_path / "stopped")]), "not running")
    # A stale admin.json pointing at a closed port.
    state = tmp_path / "stale"
    state.mkdir()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (state / "admin.json").write_text(json.dumps({"url": f"http://127.0.0.1:{port}"}))
    (state / "admin-token").write_text("secret-token-value\n")
    result = run(["resources", "list", "--state-dir", str(state)], secret="secret-token-value")
    one_line_error(result, "not running")
    result = run(["customers", "create", "x"], env={"RELAY_ADMIN_URL": f"http://127.0.0.1:{port}",
                                                    "RELAY_ADMIN_TOKEN": "secret-token-value"},
                 cwd=tmp_path, secret="secret-token-value")
    one_line_error(result, "not running")


def test_missing_token_file(admin_server, tmp_path):
    state = tmp_path / "s"
    state.mkdir()
    (state / "admin.json").write_text(json.dumps({"url": admin_server.url}))
    one_line_error(run(["customers", "list", "--state-dir", str(state)]), "admin-token")


def test_bad_admin_url(tmp_path):
    result = run(["customers", "list", "--admin-url", "ftp://x"], env={"RELAY_ADMIN_TOKEN": "t"}, cwd=tmp_path)
    one_line_error(result, "bad admin URL")


def test_serve_rejects_bad_options_cleanly(tmp_path):
    result = run(["serve", "--state-dir", str(tmp_path / "s"), "--listen", "host:notaport"])
    one_line_error(result, "port must be a number")
    result = run(["serve", "--state-dir", str(tmp_path / "s"), "--cert", str(tmp_path / "c.pem")])
    one_line_error(result, "--cert and --key")
    result = run(["serve", "--log-format", "xml"])
    assert result.returncode == 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.0.0.0:8443", ("0.0.0.0", 8443)),
        ("relay.example.com:443", ("relay.example.com", 443)),
        ("[::1]:8442", ("::1", 8442)),
        (":9000", ("0.0.0.0", 9000)),
        ("localhost", ("localhost", 1234)),
        ("::", ("::", 1234)),
        ("[::]", ("::", 1234)),
    ],
)
def test_parse_host_port(text, expected):
    from relay import parse_host_port

    assert parse_host_port(text, 1234) == expected


@pytest.mark.parametrize("text", ["", "host:", "host:x", "host:70000", "[::1", "[::1]x", "[nothex]:1"])
def test_parse_host_port_errors(text):
    from relay import parse_host_port

    with pytest.raises(ValueError):
        parse_host_port(text)
