"""The two frame codecs, for tests that run against each or compare them: the compiled
``tunnel._frames`` and its pure-Python twin ``tunnel.codec.pure``."""

from __future__ import annotations

import importlib

import pytest

CODEC_MODULES = {"cython": "tunnel._frames", "python": "tunnel.codec.pure"}
NOT_BUILT = "tunnel._frames is not built (pip install -e . or python setup.py build_ext --inplace)"


def load_codec(kind: str):
    """The codec module ``kind`` ("cython" or "python"), or None if it is not built."""
    try:
        return importlib.import_module(CODEC_MODULES[kind])
    except ImportError:
        if kind == "python":
            raise
        return None


def both_codecs() -> tuple:
    """``(compiled, twin)``; skips the test when the compiled codec is not built."""
    compiled = load_codec("cython")
    if compiled is None:
        pytest.skip(NOT_BUILT)
    return compiled, load_codec("python")
