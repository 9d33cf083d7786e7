"""Fixtures shared by every test layer.

``codec`` runs a test once per frame codec: the compiled ``tunnel._frames`` and its pure-Python
twin ``tunnel.codec.pure``; ``codec_pair`` gives both at once, for tests that compare them. The compiled one is skipped only when it is not built (CI builds it,
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


@pytest.fixture
def codec_pair():
    """``(compiled, twin)``: the two frame codec modules, for tests that compare them."""
    compiled = load_codec("cython")
    if compiled is None:
        pytest.skip("tunnel._frames is not built (pip install -e . or python setup.py build_ext --inplace)")
    return compiled, load_codec("python")
