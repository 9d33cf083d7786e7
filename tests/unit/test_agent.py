"""The agent's configuration, backoff and stream admission, without a network."""

from __future__ import annotations

import asyncio
import random

import pytest

from agent import config as agent_config
from agent.link_handler import AgentLinkHandler
from agent.runner import Agent, Backoff
from tunnel.carriers.base import LinkStream
from tunnel.wire.constants import ErrorCode

BASE = {"RELAY_URL": "wss://relay.example:8443", "REGISTRATION_JWT": "x.y.z", "NAME": "db",
        "APP_HOST": "10.0.0.5", "APP_PORT": "5432"}


def test_env_config():
    conf = agent_config.load(BASE)
    assert conf.relay_url == "wss://relay.example:8443"
    assert conf.targets == (agent_config.Target("db", "10.0.0.5", 5432),)
    assert "x.y.z" not in repr(conf)


@pytest.mark.parametrize("change, message", [
    ({"RELAY_URL": None}, "RELAY_URL is not set"),
    ({"RELAY_URL": "http://relay:1"}, "not http://; write wss://relay:1"),
    ({"RELAY_URL": "https://relay:8443"}, "not https://; write wss://relay:8443"),
    ({"RELAY_URL": "relay.example:8443"}, "has no scheme: write auto://relay.example:8443"),
    ({"RELAY_URL": "wss://relay"}, "has no port: write wss://relay:8443"),
    ({"RELAY_URL": "wss://relay:notaport"}, "bad port"),
    ({"DRAIN_TIMEOUT": "soon"}, "DRAIN_TIMEOUT must be a number"),
    ({"REGISTRATION_JWT": None}, "REGISTRATION_JWT"),
    ({"APP_PORT": "0"}, "APP_PORT must be between"),
    ({"APP_PORT": "pg"}, "APP_PORT must be a TCP port"),
    ({"APP_HOST": None}, "APP_HOST not set"),
    ({"NAME": "bad name!"}, "NAME must be"),
    ({"RELAY_CA_FILE": "/nonexistent/ca.pem"}, "RELAY_CA_FILE"),
    ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
])
def test_config_errors_are_one_clear_message(change, message):
    env = {**BASE, **change}
    env = {k: v for k, v in env.items() if v is not None}
    with pytest.raises(agent_config.ConfigError, match=message) as info:
        agent_config.load(env)
    assert "x.y.z" not in str(info.value)


@pytest.mark.parametrize("url", ["relay.example:8443", "http://relay:1", "ftp://relay:1", "wss://relay",
                                 "wss://:8443", "wss://relay:notaport", "quic://relay:99999"])
def test_one_relay_url_parser_one_message(url):
    from tunnel.bridge.dial import Dialer, parse_relay_url
    from tunnel.core.limits import Limits

    with pytest.raises(ValueError) as parsed:
        parse_relay_url(url)
    with pytest.raises(agent_config.ConfigError) as configured:
        agent_config.load({**BASE, "RELAY_URL": url})
    with pytest.raises(ValueError) as dialled:
        Dialer(url, ca_file=None, limits=Limits())
    assert str(configured.value) == str(dialled.value) == str(parsed.value)
    assert str(parsed.value).startswith(f"RELAY_URL {url!r}")



def test_jwt_file_and_toml_resources(tmp_path):
    jwt = tmp_path / "jwt"
    jwt.write_text("a.b.c\n")
    conf_file = tmp_path / "agent.toml"
    conf_file.write_text('relay_url = "quic://relay:443"\n[[resources]]\nname = "db"\nhost = "10.1.1.1"\nport = 5432\n'
                         '[[resources]]\nname = "sftp"\nhost = "10.1.1.2"\nport = 22\n')
    conf = agent_config.load({"REGISTRATION_JWT_FILE": str(jwt)}, config_file=str(conf_file))
    assert conf.token == "a.b.c"
    assert [t.name for t in conf.targets] == ["db", "sftp"]
    assert conf.target("sftp").port == 22
    assert conf.target("other") is None


def test_systemd_credential_serves_without_a_path(tmp_path):
    """LoadCredential=registration-jwt:... puts the token in $CREDENTIALS_DIRECTORY."""
    (tmp_path / "registration-jwt").write_text("c.r.d\n")
    env = {k: v for k, v in BASE.items() if k != "REGISTRATION_JWT"}
    conf = agent_config.load({**env, "CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert conf.token == "c.r.d" and conf.token_source == "systemd credential registration-jwt"
    # An explicit token wins; a credentials directory without the credential is no token.
    assert agent_config.load({**BASE, "CREDENTIALS_DIRECTORY": str(tmp_path)}).token == "x.y.z"
    (tmp_path / "registration-jwt").unlink()
    with pytest.raises(agent_config.ConfigError, match="REGISTRATION_JWT"):
        agent_config.load({**env, "CREDENTIALS_DIRECTORY": str(tmp_path)})


def test_backoff_first_retry_within_a_second_then_exponential_and_capped():
    b = Backoff(first=1.0, cap=30, rng=random.Random(1))
    delays = [b.next_delay() for _ in range(20)]
    assert 0.25 <= delays[0] <= 1.0  # the first attempt after a loss: within a second
    for n, d in enumerate(delays):
        ceiling = min(30.0, 2 ** n)
        assert ceiling / 4 <= d <= ceiling  # doubling while attempts fail ...
    assert max(delays[6:]) > 15  # ... up to the cap
    assert len(set(delays)) == len(delays)  # jittered
    b.reset()
    assert b.next_delay() <= 1.0


class FakeStream(LinkStream):
    def __init__(self, metadata: bytes) -> None:
        self.stream_id = 2
        self.metadata = metadata
        self.reset_code = None

    def write(self, data): ...
    def write_eof(self): ...
    def consume(self, n): ...

    def reset(self, code=ErrorCode.NO_ERROR):
        self.reset_code = code

    @property
    def paused(self):
        return False


def test_agent_refuses_streams_for_unconfigured_destinations_and_dials_nothing(monkeypatch):
    dialled = []

    async def main():
        loop = asyncio.get_running_loop()

        async def fake_create_connection(*args, **kwargs):
            dialled.append(args[1:])
            raise OSError("should not dial")

        async def fake_open_tcp(loop, *args, **kwargs):  # the bridge dials through the TLS engine's
            await fake_create_connection(*args, **kwargs)

        from tunnel.carriers import tls
        monkeypatch.setattr(loop, "create_connection", fake_create_connection)
        monkeypatch.setattr(tls, "open_tcp", fake_open_tcp)
        agent = Agent(agent_config.load(BASE), dialer=object())
        handler = AgentLinkHandler(agent, link=None)
        for metadata in (b"other", b"10.0.0.5:5432", b"db\x00", b"", "db".encode("utf-16")):
            stream = FakeStream(metadata)
            assert handler.stream_opened(stream) is None
            assert stream.reset_code == ErrorCode.REFUSED
        await asyncio.sleep(0)  # let any (wrongly) scheduled dial run

    asyncio.run(main())
    assert dialled == []


def test_agent_dials_only_the_configured_address(monkeypatch):
    dialled = []

    async def main():
        from tunnel.carriers import tls

        async def fake_open_tcp(loop, factory, host, port):  # the bridge dials through the TLS engine's
            dialled.append((host, port))
            raise OSError(111, "Connection refused")

        monkeypatch.setattr(tls, "open_tcp", fake_open_tcp)
        agent = Agent(agent_config.load(BASE), dialer=object())
        handler = AgentLinkHandler(agent, link=None)
        stream = FakeStream(b"db")
        assert handler.stream_opened(stream) is not None
        while agent.tasks:
            await asyncio.gather(*agent.tasks)
        assert stream.reset_code == ErrorCode.CONNECT_FAILED

    asyncio.run(main())
    assert dialled == [("10.0.0.5", 5432)]


# --------------------------------------------------------------------------- messages that name the fix


def test_relay_failures_name_the_fix():
    import ssl

    from agent import hints
    from tunnel.wire.errors import LinkError

    def wrapped(cause):
        try:
            raise LinkError(f"connecting to wss://r:8443: {cause}") from cause
        except LinkError as exc:
            return exc

    verify = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: "
                                             "unable to get local issuer certificate (_ssl.c:1006)")
    verify.verify_message = "unable to get local issuer certificate"
    text = hints.relay_failure(wrapped(verify), host="r", port=8443, ca_file="/etc/ca.pem")
    assert "not trusted by RELAY_CA_FILE /etc/ca.pem" in text and "<state-dir>/ca.pem" in text
    text = hints.relay_failure(wrapped(verify), host="r", port=8443, ca_file=None)
    assert "RELAY_CA_FILE is not set" in text
    refused = ConnectionRefusedError(111, "Connect call failed ('10.0.0.1', 8443)")
    assert "is the relay running?" in hints.relay_failure(wrapped(refused), host="r", port=8443, ca_file=None)
    assert "does not resolve" in hints.relay_failure(wrapped(__import__("socket").gaierror(-2, "Name or service "
                                                                                              "not known")),
                                                     host="r", port=8443, ca_file=None)


def test_target_failures_name_the_setting_to_fix():
    import socket

    from agent import hints

    env_target = agent_config.Target("db", "db.invalid", 5432)
    file_target = agent_config.Target("sftp", "10.0.0.2", 22, origin="[[resources]] sftp in agent.toml")
    reason, detail, fix = hints.target_failure(env_target, socket.gaierror(-2, "Name or service not known"), 10)
    assert reason == hints.DNS and "db.invalid does not resolve" in detail and "fix APP_HOST" in fix
    reason, detail, fix = hints.target_failure(file_target, ConnectionRefusedError(111, "refused"), 10)
    assert reason == hints.REFUSED and "10.0.0.2:22" in detail
    assert "the port of [[resources]] sftp in agent.toml" in fix
    # asyncio's error when every address of a name refused (localhost: ::1 and 127.0.0.1).
    both = OSError("Multiple exceptions: [Errno 111] Connect call failed ('::1', 22, 0, 0), "
                   "[Errno 111] Connect call failed ('127.0.0.1', 22)")
    assert hints.target_failure(file_target, both, 10)[0] == hints.REFUSED
    assert hints.target_failure(file_target, TimeoutError(), 10)[0] == hints.TIMEOUT


# --------------------------------------------------------------------------- target health


def test_target_health_logs_and_reports_changes_once():
    from agent.health import TargetHealth

    now = [100.0]
    changed = []
    health = TargetHealth(10.0, 30.0, on_change=changed.append, clock=lambda: now[0])
    target = agent_config.Target("db", "10.0.0.5", 5432)
    assert health.due(target)  # never tried
    assert health.report(["db"]) == []  # nothing known yet: nothing said
    health.result(target, ConnectionRefusedError(111, "refused"))
    health.result(target, ConnectionRefusedError(111, "refused"))
    assert changed == ["db"]  # the second failure of the same kind is no news
    [entry] = health.report(["db", "other"])
    assert entry["name"] == "db" and entry["reachable"] is False and entry["reason"] == "refused"
    assert "10.0.0.5" not in str(entry)  # the private address stays with the agent
    health.result(target, None)
    assert changed == ["db", "db"] and health.report(["db"])[0]["reachable"] is True
    assert not health.due(target)
    now[0] += 31
    assert health.due(target)  # idle for an interval: checked again


# --------------------------------------------------------------------------- reload


def test_reload_applies_a_new_file_and_refuses_a_bad_one(tmp_path):
    jwt = tmp_path / "jwt"
    jwt.write_text("a.b.c\n")
    config = tmp_path / "agent.toml"

    def write(resources):
        config.write_text('relay_url = "wss://relay:8443"\n' + "".join(
            f'[[resources]]\nname = "{n}"\nhost = "10.0.0.1"\nport = {p}\n' for n, p in resources.items()))

    write({"a": 1, "b": 2, "c": 3})
    env = {"REGISTRATION_JWT_FILE": str(jwt)}
    agent = Agent(agent_config.load(env, str(config)), dialer=object(), environ=env)
    write({"a": 1, "c": 4, "d": 5})
    assert agent.reload()
    assert [t.name for t in agent.config.targets] == ["a", "c", "d"]
    assert agent.route("c").port == 4 and agent.route("b") is None  # not linked: nothing retires
    config.write_text("relay_url = \n")
    assert not agent.reload()
    assert [t.name for t in agent.config.targets] == ["a", "c", "d"]  # the old configuration runs on
    env_only = Agent(agent_config.load(BASE), dialer=object(), environ=BASE)
    assert not env_only.reload()  # nothing to read again


@pytest.mark.parametrize("argv, expected", [
    (["check"], []),
    (["check", "--config", "a.toml", "-o", "json"], ["--config", "a.toml", "-o", "json"]),
    (["--config", "a.toml", "check"], ["--config", "a.toml"]),
    (["--config", "a.toml", "check", "--timeout", "2"], ["--config", "a.toml", "--timeout", "2"]),
    (["--config", "check", "check"], ["--config", "check"]),  # a config file named "check"
])
def test_check_takes_global_options_before_or_after_it(monkeypatch, argv, expected):
    from agent import check, cli

    seen = []
    monkeypatch.setattr(check, "main", lambda args: seen.append(args) or 0)
    assert cli.main(argv) == 0
    assert seen == [expected]


def test_usage_line_shows_check(capsys):
    from agent import cli

    with pytest.raises(SystemExit):
        cli.main(["--help"])
    usage = capsys.readouterr().out.splitlines()[0]
    assert usage.startswith("usage: tunnel-agent") and "--config FILE" in usage and "check" in usage


@pytest.mark.parametrize("url", ["127.0.0.1", "relay.example", "relay.example:9000", "https://relay.example",
                                 "http://relay.example:1", "ws://[::1]"])
def test_a_suggested_relay_url_is_one_the_agent_accepts(url):
    import re

    with pytest.raises(agent_config.ConfigError) as info:
        agent_config.check_relay_url(url)
    suggested = re.search(r"write (\S+)", str(info.value)).group(1)
    agent_config.check_relay_url(suggested)  # no error: following the advice works


def test_ca_file_from_the_config_file_is_named_so(tmp_path):
    conf = tmp_path / "agent.toml"
    conf.write_text('ca_file = "/nonexistent/ca.pem"\n')
    with pytest.raises(agent_config.ConfigError, match=f"^ca_file in {conf} /nonexistent/ca.pem is not"):
        agent_config.load(BASE, str(conf))
    with pytest.raises(agent_config.ConfigError, match="^RELAY_CA_FILE /elsewhere.pem is not"):
        agent_config.load({**BASE, "RELAY_CA_FILE": "/elsewhere.pem"}, str(conf))


def test_check_piped_into_a_reader_that_left_prints_no_traceback():
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    read, write = os.pipe()
    os.close(read)  # like `| head -1` that has exited
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "TUNNEL_"))},
           "RELAY_URL": "127.0.0.1", "PYTHONPATH": str(root)}
    try:
        out = subprocess.run([sys.executable, "-m", "agent", "check"], stdout=write, stderr=subprocess.PIPE,
                             text=True, timeout=60, cwd=root, env=env)
    finally:
        os.close(write)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr


class _Identity:
    """What Agent._enrol_only reads of agent.identity: a lock and whether the certificate is usable."""

    instance = None

    def __init__(self, certified: bool) -> None:
        self.busy = asyncio.Lock()
        self.certified = certified

    def usable(self, now: float) -> bool:
        return self.certified


class _Link:
    closed = None

    def close(self, code, reason="") -> None:
        self.closed = (code, reason)


@pytest.mark.parametrize("case", ["enrols", "another slot enrolled", "enrolment failed", "no state directory",
                                  "a link by certificate"])
def test_an_enroll_only_link_enrols_then_links_again_at_once_else_backs_off(case):
    """--require-agent-certificates: a token link admitted to enrol only enrols and relinks at
    once (Enrolled); anything else is a link failure, retried with backoff, never a tight loop."""
    from agent.runner import Enrolled
    from tunnel.wire.errors import LinkError

    async def main():
        identity = None if case == "no state directory" else _Identity(
            certified=case in ("another slot enrolled", "a link by certificate"))
        agent = Agent(agent_config.load(BASE), dialer=object(), identity=identity)
        asked = []

        async def enrol(handler):
            asked.append(handler)
            identity.certified = case == "enrols"
            return 60.0

        agent._enrol = enrol
        handler = AgentLinkHandler(agent, link=_Link())
        with pytest.raises(LinkError) as raised:
            await agent._enrol_only(handler, by_token=case != "a link by certificate")
        return raised.value, asked, handler.link.closed

    raised, asked, closed = asyncio.run(main())
    assert isinstance(raised, Enrolled) == (case in ("enrols", "another slot enrolled"))
    assert len(asked) == (1 if case in ("enrols", "enrolment failed") else 0)
    assert closed is not None and closed[0] == ErrorCode.NO_ERROR
