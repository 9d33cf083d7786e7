"""Fixtures shared by every test layer.

``codec`` runs a test once per frame codec: the compiled ``tunnel._frames`` and its pure-Python
twin ``tunnel.codec.pure``. The compiled one is skipped only when it is not built (CI builds it,
and ``tests/unit/test_frames.py::test_compiled_codec_is_in_use`` fails there if it is missing).
"""

from __future__ import annotations

import importlib
import os

import pytest
from hypothesis import HealthCheck, settings

# Modest example counts and no per-example deadline: the suite runs on small, shared, loaded
# machines. HYPOTHESIS_PROFILE=thorough digs deeper when hunting a bug.
settings.register_profile(
    "tunnel", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "tunnel"))

CODEC_MODULES = {"cython": "tunnel._frames", "python": "tunnel.codec.pure"}


def load_codec(kind: str):
    """The codec module ``kind`` ("cython" or "python"), or None if it is not built."""
    try:
        return importlib.import_module(CODEC_MODULES[kind])
    except ImportError:
        if kind == "python":
            raise
        return None


@pytest.fixture(params=sorted(CODEC_MODULES), ids=lambda kind: kind)
def codec(request):
    """Each frame codec module in turn (same API: see tunnel/_frames.pyi)."""
    module = load_codec(request.param)
    if module is None:
        pytest.skip("tunnel._frames is not built (pip install -e . or python setup.py build_ext --inplace)")
    return module


# --------------------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="session")
def postgres_server():
    """One real PostgreSQL for the whole session (Debian's binaries, initdb in a temporary
    directory, loopback, a free port), started on first use and destroyed at the end."""
    from tests.helpers.postgres import PostgresServer, bin_dir

    if bin_dir() is None:
        pytest.fail("PostgreSQL server binaries are missing: run scripts/setup.sh (Debian package postgresql)")
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def postgres_url(postgres_server):
    """A fresh, empty database on the session's PostgreSQL (dropped afterwards); its URL
    carries the password."""
    name = postgres_server.create_database()
    try:
        yield postgres_server.url(name)
    finally:
        if not postgres_server.running():  # a test that stopped it and failed before restarting
            postgres_server.start()
        postgres_server.drop_database(name)
