"""The cluster's CLI and process surface: ``tunnel-relay cluster status``, ``--database`` and
``--advertise`` checks, a database that cannot be reached at start, and the PostgreSQL driver
staying out of the agent (and of a relay on SQLite)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from relay_fakes import REPO, fake_agent, one_line_error, run

from relay.state.cluster import check_advertise_url, default_advertise_url


def test_cluster_status(relay):
    server = relay.server
    status = json.loads(relay("cluster", "status", "--output", "json").stdout)
    assert status["relay_id"] == server.cluster.relay_id and status["relay_id"].startswith("rly_")
    assert status["database"] == {"backend": "sqlite", "url": f"sqlite:///{server.state_dir / 'relay.db'}",
                                  "available": True}
    assert [(r["id"], r["advertise_url"], r["self"], r["links"]) for r in status["relays"]] == [
        (server.cluster.relay_id, "wss://127.0.0.1:8443", True, 0)]
    assert status["links"] == []
    table = relay("cluster", "status")
    assert table.returncode == 0, table.stderr
    assert server.cluster.relay_id in table.stdout and "(this relay)" in table.stdout
    assert "AGENT" in table.stdout and "EPOCH" in table.stdout


def test_extended_resources_name_the_relay_of_each_agent(relay):
    server = relay.server
    customer = server.call(server.state.create_customer, "acme")
    db = server.call(server.state.get_or_create_resource, customer["id"], "db", lambda taken: 25100)
    server.registry.agents[db["id"]] = [fake_agent("agt_one")]
    detail = json.loads(relay("resources", "list", "--extended", "-o", "json").stdout)[0]["agents_detail"]
    assert [(a["agent_id"], a["relay_id"], a["relay_url"]) for a in detail] == [
        ("agt_one", server.cluster.relay_id, "wss://127.0.0.1:8443")]
    assert server.cluster.relay_id in relay("resources", "list", "--extended").stdout


@pytest.mark.parametrize(("args", "fragment"), [
    (["--database", "mysql://u@h/d"], "unsupported database URL"),
    (["--advertise", "http://relay.example:443"], "bad advertise URL"),
    (["--advertise", "wss://relay.example"], "bad advertise URL"),
])
def test_serve_refuses_bad_cluster_options(tmp_path, args, fragment):
    one_line_error(run(["serve", "--state-dir", str(tmp_path / "s"), *args]), fragment)


def test_unreachable_database_at_start_is_a_clear_error_without_the_password(tmp_path):
    started = time.monotonic()
    result = run(["serve", "--state-dir", str(tmp_path / "s"), "--listen", "127.0.0.1:0", "--admin-listen",
                  "127.0.0.1:0", "--database", "postgresql://relay:hunter2secret@127.0.0.1:1/tunnel"],
                 env={"RELAY_DB_STARTUP_TIMEOUT": "1"}, secret="hunter2secret")
    assert result.returncode == 1
    assert time.monotonic() - started < 30
    assert "process listings show" in result.stderr  # the password belongs in the environment
    assert "relay cannot start: state database unreachable" in result.stderr
    assert "postgresql://relay@127.0.0.1:1/tunnel" in result.stderr


def test_advertise_urls():
    assert default_advertise_url("127.0.0.2", 8443) == "wss://127.0.0.2:8443"
    assert default_advertise_url("0.0.0.0", 443, ["relay1.example"]) == "wss://relay1.example:443"
    assert default_advertise_url("::1", 443) == "wss://[::1]:443"
    assert check_advertise_url("quic://relay.example:443/") == "quic://relay.example:443"


PROBE = """
import sys
{imports}
print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('asyncpg', 'psycopg'))))
"""


def test_the_agent_never_imports_the_postgres_driver():
    code = PROBE.format(imports="import json, agent.cli, agent.runner, agent.config, tunnel.bridge.dial")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert json.loads(out.stdout) == []


def test_a_relay_on_sqlite_does_not_import_it_either(tmp_path):
    imports = ("import json, asyncio, relay.serve, relay.state.cluster\n"
               "from relay.state.relay_state import RelayState\n"
               f"asyncio.run(RelayState.open({str(tmp_path)!r})).db.close_sync()")
    out = subprocess.run([sys.executable, "-c", PROBE.format(imports=imports)], capture_output=True, text=True,
                         cwd=REPO, check=True)
    assert json.loads(out.stdout) == []


@pytest.mark.parametrize("source", ["RELAY_DATABASE_URL_FILE", "CREDENTIALS_DIRECTORY"])
def test_the_database_url_from_a_file_or_a_systemd_credential(tmp_path, source):
    """The password stays out of relay.env and process listings: the URL is read from a file
    (mode 0600) or from the credential systemd hands the unit (LoadCredential=database-url:…)."""
    secret_dir = tmp_path / "credentials"
    secret_dir.mkdir()
    (secret_dir / "database-url").write_text("postgresql://relay:hunter2secret@127.0.0.1:1/tunnel\n")
    env = {"RELAY_DB_STARTUP_TIMEOUT": "1"}
    env[source] = str(secret_dir / "database-url") if source == "RELAY_DATABASE_URL_FILE" else str(secret_dir)
    result = run(["serve", "--state-dir", str(tmp_path / "s"), "--listen", "127.0.0.1:0", "--admin-listen",
                  "127.0.0.1:0"], env=env, secret="hunter2secret")
    assert result.returncode == 1
    assert "relay cannot start: state database unreachable: postgresql://relay@127.0.0.1:1/tunnel" in result.stderr
    assert "process listings show" not in result.stderr


def test_an_empty_credential_means_the_embedded_database_and_a_missing_file_is_an_error(tmp_path, monkeypatch):
    missing = run(["serve", "--state-dir", str(tmp_path / "s")],
                  env={"RELAY_DATABASE_URL_FILE": str(tmp_path / "nope")})
    one_line_error(missing, "cannot read RELAY_DATABASE_URL_FILE")
    from relay.cli import _database_url

    (tmp_path / "database-url").write_text("")
    for name in ("RELAY_DATABASE_URL", "RELAY_DATABASE_URL_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert _database_url(None) is None
