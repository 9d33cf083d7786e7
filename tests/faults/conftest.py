"""Fixtures of the fault, hostile-input and load tests (helpers in faultkit.py)."""

import pytest

from tests.faults.faultkit import FAST
from tests.helpers.fixtures import agents, relay, service_factory, transport  # noqa: F401


@pytest.fixture
def relay_env() -> dict:
    return dict(FAST)
