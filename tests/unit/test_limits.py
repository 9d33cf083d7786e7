"""The limits object: validation, environment overrides, and docs/LIMITS.md listing every field."""

import dataclasses
from pathlib import Path

import pytest

from agent.settings import AgentSettings
from relay.settings import RelaySettings
from tunnel.core.limits import DEFAULT_LIMITS, Limits

DOC = Path(__file__).resolve().parents[2] / "docs" / "LIMITS.md"


def test_every_limit_is_documented():
    text = DOC.read_text()
    missing = [f.name for cls in (Limits, RelaySettings, AgentSettings) for f in dataclasses.fields(cls)
               if f"`{f.name.upper()}`" not in text]
    assert not missing, f"docs/LIMITS.md does not list: {missing}"


def test_the_relay_and_the_agent_keep_their_own_settings():
    """Limits holds what a link needs; the relay's and the agent's settings are their own
    objects, read from the same TUNNEL_<FIELD> variables (a name means one thing)."""
    link = {f.name for f in dataclasses.fields(Limits)}
    relay = {f.name for f in dataclasses.fields(RelaySettings)}
    agent = {f.name for f in dataclasses.fields(AgentSettings)}
    assert not link & (relay | agent)
    assert relay & agent == {"max_metrics_connections"}
    assert {"endpoint_hold_timeout", "fd_reserve", "max_links_per_customer"} <= relay
    assert {"target_check_interval", "reconnect_delay", "connect_timeout"} <= agent
    settings = RelaySettings.from_env({"TUNNEL_ENDPOINT_HOLD_TIMEOUT": "0", "TUNNEL_FD_RESERVE": "100",
                                       "TUNNEL_KEEPALIVE_TIMEOUT": "30"})
    assert settings.endpoint_hold_timeout == 0 and settings.fd_reserve == 100
    assert AgentSettings.from_env({"TUNNEL_RECONNECT_DELAY": "2"}).reconnect_delay == 2.0
    with pytest.raises(ValueError, match="customer_fd_share"):
        RelaySettings.from_env({"TUNNEL_CUSTOMER_FD_SHARE": "2"})
    with pytest.raises(ValueError, match="TUNNEL_FD_RESERVE must be a number"):
        RelaySettings.from_env({"TUNNEL_FD_RESERVE": "many"})
    with pytest.raises(ValueError, match="reconnect_max_delay must be at least reconnect_delay"):
        AgentSettings.from_env({"TUNNEL_RECONNECT_DELAY": "60"})
    with pytest.raises(ValueError, match="connect_timeout must be positive"):
        AgentSettings.from_env({"TUNNEL_CONNECT_TIMEOUT": "0"})


def test_defaults_fill_a_long_fat_pipe():
    assert DEFAULT_LIMITS.initial_stream_window >= 6 * 1024 * 1024  # 1 Gbit/s x 50 ms
    assert DEFAULT_LIMITS.session_window >= DEFAULT_LIMITS.initial_stream_window


def test_environment_overrides_and_errors():
    limits = Limits.from_env({"TUNNEL_KEEPALIVE_TIMEOUT": "30", "TUNNEL_MAX_FRAME_SIZE": "65536"})
    assert limits.keepalive_timeout == 30.0 and limits.max_frame_size == 65536
    with pytest.raises(ValueError, match="TUNNEL_MAX_FRAME_SIZE must be a number"):
        Limits.from_env({"TUNNEL_MAX_FRAME_SIZE": "big"})
    with pytest.raises(ValueError, match="max_frame_size"):
        Limits.from_env({"TUNNEL_MAX_FRAME_SIZE": "10"})
    with pytest.raises(ValueError, match="keepalive_timeout must exceed"):
        Limits.from_env({"TUNNEL_KEEPALIVE_TIMEOUT": "1"})
    with pytest.raises(ValueError, match="send_quantum must be positive"):
        Limits.from_env({"TUNNEL_SEND_QUANTUM": "0"})


def test_the_agents_quic_engine_is_checked_at_start(monkeypatch, capsys):
    """TUNNEL_QUIC_ENGINE is read with the agent's settings: an unknown engine, or qh3 when it
    is not installed, stops tunnel-agent at start with one line (not a traceback at its first
    QUIC dial)."""
    from agent import cli

    assert AgentSettings.from_env({}).quic_engine == "aioquic"
    with pytest.raises(ValueError, match="TUNNEL_QUIC_ENGINE must be one of aioquic, qh3, got 'quiche'"):
        AgentSettings.from_env({"TUNNEL_QUIC_ENGINE": "quiche"})
    monkeypatch.setattr("tunnel.quic_engine.available", lambda name: False)
    with pytest.raises(ValueError, match=r"qh3 is not installed: pip install 'tunnel-agent-relay\[qh3\]'"):
        AgentSettings.from_env({"TUNNEL_QUIC_ENGINE": "qh3"})
    for name, value in {"RELAY_URL": "quic://relay.example.com:8443", "NAME": "db", "APP_HOST": "127.0.0.1",
                        "APP_PORT": "5432", "REGISTRATION_JWT": "a.b.c", "TUNNEL_QUIC_ENGINE": "qh3"}.items():
        monkeypatch.setenv(name, value)
    assert cli.main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tunnel-agent: the QUIC engine qh3 is not installed" in err[0], err
