"""The limits object: validation, environment overrides, and docs/LIMITS.md listing every field."""

import dataclasses
from pathlib import Path

import pytest

from tunnel.core.limits import DEFAULT_LIMITS, Limits

DOC = Path(__file__).resolve().parents[2] / "docs" / "LIMITS.md"


def test_every_limit_is_documented():
    text = DOC.read_text()
    missing = [f.name for f in dataclasses.fields(Limits) if f"`{f.name.upper()}`" not in text]
    assert not missing, f"docs/LIMITS.md does not list: {missing}"


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
    with pytest.raises(ValueError, match="must be positive"):
        Limits.from_env({"TUNNEL_CONNECT_TIMEOUT": "0"})
