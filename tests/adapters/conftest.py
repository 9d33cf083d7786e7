"""Fixtures for the adapter tests (``run``, on uvloop and asyncio, comes from tests/conftest.py)."""

from __future__ import annotations

import pytest

from tests.helpers import async_wait_until, make_pki


@pytest.fixture
def wait_until():
    """The shared :func:`tests.helpers.async_wait_until`, for tests that poll a condition."""
    return async_wait_until


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A throwaway CA and a server certificate for localhost, 127.0.0.1 and ::1."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def certs(pki, tmp_path_factory):
    """:func:`pki` as file names (``ca``, ``cert``, ``key``), and ``other_ca``: a CA that
    signed nothing the servers present."""
    other = make_pki(tmp_path_factory.mktemp("other-pki"))
    return {"ca": str(pki.ca_file), "cert": str(pki.cert_file), "key": str(pki.key_file), "other_ca": str(other.ca_file)}
