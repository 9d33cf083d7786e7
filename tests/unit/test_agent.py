"""The agent's configuration, backoff and stream admission, without a network."""

from __future__ import annotations

import asyncio
import random

import pytest

from agent import config as agent_config
from agent.runner import Agent, AgentLinkHandler, Backoff
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

        monkeypatch.setattr(loop, "create_connection", fake_create_connection)
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
        loop = asyncio.get_running_loop()

        async def fake_create_connection(factory, host, port, **kwargs):
            dialled.append((host, port))
            raise OSError(111, "Connection refused")

        monkeypatch.setattr(loop, "create_connection", fake_create_connection)
        agent = Agent(agent_config.load(BASE), dialer=object())
        handler = AgentLinkHandler(agent, link=None)
        stream = FakeStream(b"db")
        assert handler.stream_opened(stream) is not None
        while agent.tasks:
            await asyncio.gather(*agent.tasks)
        assert stream.reset_code == ErrorCode.CONNECT_FAILED

    asyncio.run(main())
    assert dialled == [("10.0.0.5", 5432)]
