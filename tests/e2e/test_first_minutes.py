"""The first minutes of a newcomer: each natural mistake gets one clear line that names the
fix, from the agent (and, where a worker is involved, a prompt reset with the reason in the
relay's log: tests/e2e/test_target_health.py); the help says what can be set; DEBUG logs debug."""

from __future__ import annotations

import signal
import subprocess

import pytest

from tests.helpers.processes import PY, ROOT, Relay, _env, free_port, wait_until


def _agent_once(**env) -> subprocess.CompletedProcess:
    """``tunnel-agent`` with ``env`` that must stop at once (a configuration mistake)."""
    return subprocess.run([PY, "-m", "agent"], env=_env(**env), capture_output=True, text=True, timeout=60, cwd=ROOT)


def _lines_with(text: str, fragment: str) -> list[str]:
    return [line for line in text.splitlines() if fragment in line]


BASE = {"NAME": "db", "APP_HOST": "127.0.0.1", "APP_PORT": "5432", "REGISTRATION_JWT": "a.b.c"}


@pytest.mark.parametrize("env, line", [
    ({"RELAY_URL": "https://relay.example.com:8443"},
     "not https://; write wss://relay.example.com:8443"),
    ({"RELAY_URL": "relay.example.com:8443"}, "has no scheme: write auto://relay.example.com:8443"),
    ({"RELAY_URL": "wss://relay.example.com"},
     "has no port: write wss://relay.example.com:8443 (the relay's default agent port)"),
    ({"RELAY_URL": None}, "RELAY_URL is not set: set it to auto://HOST:8443"),
    ({"RELAY_URL": "wss://r:8443", "APP_PORT": None}, "APP_PORT not set (NAME, APP_HOST and APP_PORT go together)"),
    ({"RELAY_URL": "wss://r:8443", "REGISTRATION_JWT": None},
     "get one with 'tunnel-relay resources registration-jwt --customer-id ID'"),
    ({"RELAY_URL": "wss://r:8443", "RELAY_CA_FILE": "/nonexistent/ca.pem"},
     "copy the relay's <state-dir>/ca.pem here and point RELAY_CA_FILE at the copy"),
])
def test_configuration_mistakes_stop_with_one_line_that_names_the_fix(env, line):
    result = _agent_once(**{**BASE, **env})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and line in lines[0], result.stderr


def test_check_agrees_on_a_url_without_port():
    result = subprocess.run([PY, "-m", "agent", "check"], env=_env(**BASE, RELAY_URL="wss://relay.example.com"),
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 1
    assert _lines_with(result.stdout, "FAIL  config")[0].count("has no port: write wss://relay.example.com:8443")


def test_help_lists_the_environment_and_every_tunable():
    import dataclasses

    from agent.settings import AgentSettings
    from tunnel.core.limits import Limits

    text = subprocess.run([PY, "-m", "agent", "--help"], env=_env(), capture_output=True, text=True,
                          timeout=60, cwd=ROOT).stdout
    for name in ("RELAY_URL", "RELAY_CA_FILE", "LOG_LEVEL", "LOG_FORMAT", "DRAIN_TIMEOUT", "SIGHUP"):
        assert name in text
    for field in (*dataclasses.fields(Limits), *dataclasses.fields(AgentSettings)):
        assert f"TUNNEL_{field.name.upper()}=" in text


def test_runtime_mistakes_name_the_fix(tmp_path, relay, agents, service_factory):
    service = service_factory("echo")
    customer = relay.create_customer("acme")
    token = relay.jwt("--customer-id", customer)
    url = f"wss://127.0.0.1:{relay.port}"

    # The wrong CA file (a valid bundle, not the relay's CA), and none at all.
    wrong = agents.start(url, token, "db", service.port, ca_file="/etc/ssl/certs/ca-certificates.crt")
    none = agents.start(url, token, "db", service.port)
    # The relay not running when the agent starts.
    down = agents.start(f"wss://127.0.0.1:{free_port()}", token, "db", service.port, ca_file=relay.ca_file)
    # A JWT another relay issued.
    (tmp_path / "other").mkdir()
    other = Relay(tmp_path / "other")
    other.start()
    foreign = other.jwt("--customer-id", other.create_customer("acme"))
    other.stop()
    stranger = agents.start(url, foreign, "db", service.port, ca_file=relay.ca_file)

    wait_until(lambda: "reconnecting in" in wrong.log() and "reconnecting in" in none.log()
               and "reconnecting in" in down.log() and not stranger.alive(), 30, "each agent's first failure")
    assert _lines_with(wrong.log(), "relay unreachable: the relay's certificate is not trusted by RELAY_CA_FILE "
                                    "/etc/ssl/certs/ca-certificates.crt")[0].count(
        "it is the wrong file; the relay's own CA is <state-dir>/ca.pem on the relay host")
    assert _lines_with(none.log(), "not trusted by this system's store")[0].count(
        "RELAY_CA_FILE is not set; the relay's own CA is <state-dir>/ca.pem on the relay host")
    assert _lines_with(down.log(), "relay unreachable: nothing listens on 127.0.0.1:")[0].count(
        "is the relay running? RELAY_URL must name its agent port")
    assert stranger.proc.returncode == 3
    assert _lines_with(stranger.log(), "relay refused this agent")[0].count(
        "fix: this JWT was issued by another relay")
    # The relay says why the TLS handshakes failed, not an empty error.
    relay_log = relay.proc.log()
    assert "TLS handshake failed: the client closed the connection during the handshake" in relay_log
    assert "TLS handshake failed: \n" not in relay_log

    # LOG_LEVEL=DEBUG (the agents fixture's default) prints debug lines from the start.
    assert " DEBUG " in down.log().splitlines()[1]

    # A graceful relay shutdown is news, not a warning.
    good = agents.start(url, token, "db", service.port, ca_file=relay.ca_file)
    relay.wait_available(customer, "db")
    relay.proc.signal(signal.SIGTERM)
    relay.proc.proc.wait(20)
    wait_until(lambda: "the relay closed the link" in good.log(), 10, "the agent to notice")
    line = _lines_with(good.log(), "the relay closed the link")[0]
    assert " INFO " in line and "reconnecting in" in line
    assert "peer sent GOAWAY (code 0): relay shutting down" in good.log()
    assert " WARNING " not in good.log().split("relay shutting down")[1].split("reconnecting in")[0]
