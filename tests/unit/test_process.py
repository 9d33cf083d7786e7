"""Process tuning: glibc's malloc thresholds set through the small C module
``tunnel.ops._malloc``, or ctypes where it is not built; False off glibc."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from tunnel.ops import process

ROOT = Path(__file__).resolve().parents[2]
GLIBC = platform.libc_ver()[0] == "glibc"


def run_python(code: str) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_tune_malloc_uses_the_extension_not_ctypes():
    """CI builds ``tunnel.ops._malloc`` (pip install -e . or python setup.py build_ext --inplace);
    ctypes would cost the agent about 180 KB of RSS more."""
    out = run_python("import sys; from tunnel.ops import process; "
                     "print(process.tune_malloc(), 'tunnel.ops._malloc' in sys.modules, 'ctypes' in sys.modules)")
    assert out == [str(GLIBC), "True", "False"]


def test_tune_malloc_without_the_extension_uses_ctypes():
    out = run_python("import sys; sys.modules['tunnel.ops._malloc'] = None; from tunnel.ops import process; "
                     "print(process.tune_malloc(), 'ctypes' in sys.modules)")
    assert out == [str(GLIBC), str(GLIBC)]


def test_ctypes_fallback_is_false_off_glibc(monkeypatch):
    def no_glibc(name):
        raise ValueError(f"unrecognized configuration name {name!r}")

    monkeypatch.setattr(process.os, "confstr", no_glibc)
    assert process._ctypes_tune_malloc(2 << 20, 8 << 20) is False


def test_extension_sets_the_thresholds():
    from tunnel.ops import _malloc

    assert _malloc.tune_malloc(process.MALLOC_MMAP_THRESHOLD, process.MALLOC_TRIM_THRESHOLD) is GLIBC


@pytest.mark.parametrize("args", [("2", 1), (1,), (2**40, 1)], ids=["str", "one", "huge"])
def test_extension_rejects_bad_arguments(args):
    from tunnel.ops import _malloc

    with pytest.raises((TypeError, OverflowError)):
        _malloc.tune_malloc(*args)


FRAGMENT = """
import sys
{setup}
from tunnel.ops import process
process.tune_malloc()
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096
blocks = [bytearray(100_000) for _ in range(600)]
del blocks[::2]  # about 30 MB free between live blocks, kept by the thresholds above
before = rss()
released = process.release_free_memory()
print(released, before - rss() > 20 << 20, 'ctypes' in sys.modules)
"""


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's")
@pytest.mark.parametrize("ctypes_path", [False, True], ids=["extension", "ctypes"])
def test_release_free_memory_returns_free_pages_between_live_blocks(ctypes_path):
    """A burst leaves freed pages between live blocks: RSS that no object holds until trimmed."""
    setup = "sys.modules['tunnel.ops._malloc'] = None" if ctypes_path else ""
    assert run_python(FRAGMENT.format(setup=setup)) == ["True", "True", str(ctypes_path)]


def test_release_free_memory_is_false_off_glibc(monkeypatch):
    def no_glibc(name):
        raise ValueError(f"unrecognized configuration name {name!r}")

    monkeypatch.setattr(process.os, "confstr", no_glibc)
    assert process._ctypes_trim() is False
