"""Fixtures for the adapter tests (``run``, on uvloop and asyncio, comes from tests/conftest.py)."""

from __future__ import annotations

import pytest

from tests.helpers import async_wait_until


@pytest.fixture
def wait_until():
    """The shared :func:`tests.helpers.async_wait_until`, for tests that poll a condition."""
    return async_wait_until
