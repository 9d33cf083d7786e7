"""Fixtures of the fault, hostile-input and load tests (helpers in faultkit.py)."""

import pytest

from tests.faults.faultkit import FAST
from tests.helpers.processes import Agents, PrivateService, Relay


@pytest.fixture
def relay(tmp_path):
    r = Relay(tmp_path)
    r.start(**FAST)
    yield r
    r.stop()


@pytest.fixture
def agents(tmp_path):
    a = Agents(tmp_path)
    yield a
    a.stop_all()


@pytest.fixture
def service_factory():
    services = []

    def make(mode: str = "echo", greeting: bytes = b"") -> PrivateService:
        s = PrivateService(mode, greeting)
        services.append(s)
        return s

    yield make
    for s in services:
        s.close()


@pytest.fixture(params=["wss", "quic"])
def transport(request):
    return request.param
