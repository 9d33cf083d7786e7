"""Fixtures shared by the end-to-end and fault suites: real relay and agent processes and
private services (helpers in processes.py). A suite's conftest imports them and may override
``relay_env`` (environment for the relay process, e.g. short keepalives)."""

import pytest

from tests.helpers.processes import Agents, PrivateService, Relay


@pytest.fixture
def relay_env() -> dict:
    return {}


@pytest.fixture
def relay(tmp_path, relay_env):
    r = Relay(tmp_path)
    r.start(**relay_env)
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

    def make(mode: str = "echo", greeting: bytes = b"", port: int = 0) -> PrivateService:
        s = PrivateService(mode, greeting, port)
        services.append(s)
        return s

    yield make
    for s in services:
        s.close()


@pytest.fixture(params=["wss", "quic"])
def transport(request):
    return request.param


@pytest.fixture
def reg(tmp_path):
    """A :class:`bench.peers.procs.ProcessRegistry` (the benchmark harness's processes, logs in
    the test's directory), closed with every process it started."""
    from bench.peers.procs import ProcessRegistry

    r = ProcessRegistry(tmp_path / "logs")
    try:
        yield r
    finally:
        r.close()


@pytest.fixture
def postgres():
    """The port of a PostgreSQL server of its own on 127.0.0.1 (superuser ``postgres``, trust
    auth): the private service of the psql and pgbench tests."""
    import shutil

    from tests.helpers.postgres import bin_dir, trust_server

    if bin_dir() is None or not shutil.which("psql") or not shutil.which("pgbench"):
        pytest.skip("PostgreSQL server binaries, psql and pgbench are not installed (scripts/setup.sh installs them)")
    with trust_server() as port:
        yield port
